"""Exact resume for transformers' Trainer subclasses.

transformers 5 writes GPTNeoX's (Pythia's) output head under its legacy name `embed_out`, while Trainer's resume
loads the raw state dict non-strictly: the head is silently left at its initial weights and the resumed run
drifts from the uninterrupted one. We load the checkpoint through `from_pretrained`, which maps the names, and
copy it in strictly, so a partial load is an error rather than a quiet difference.
"""
from __future__ import annotations


class ExactResumeMixin:
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # their engines load their own shards
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        dtype = next(target.parameters()).dtype
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)
