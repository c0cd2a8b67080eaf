"""SFT stage: TRL's SFTTrainer on demonstrations (synthetic task or UltraChat-200k), cached per model, data and `sft.seed`
(shared by every PO seed of a sweep).

The build checkpoints inside its cache-build folder (`<hash>.partial/checkpoints/`, the newest only) every
`model.sft.save_steps` steps and every `runtime.checkpoint_every_min` minutes; a build killed or preempted and
started again (the same command, a SLURM requeue) continues from there and ends with the weights an uninterrupted
build would have (bitwise on CPU with a fixed thread count: runtime.threads or runtime.deterministic).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from .. import distributed
from ..cache import cached
from ..config import DATA_SCHEMAS, ModelConfig, schema_of, stage_settings
from ..checkpoints import StepCounter, build_checkpointing, resumed_step
from ..data.synthetic import DictionaryTask
from ..models import build_tiny_model, build_word_tokenizer, load_model, load_tokenizer, resolve_model_source
from ..tasks import task_of
from ..trainers.resume import ExactResumeMixin
from .common import trainer_kwargs

log = logging.getLogger(__name__)

def sft_key(cfg) -> dict:
    """What determines the SFT model: the model and data settings SFT reads (config.stage_settings: every field but
    those marked `how` or read by later stages only, e.g. model.dpo, data.n_pref_prompts) and `sft.seed`."""
    model = stage_settings(cfg.model, schema_of(cfg.model) or ModelConfig, "sft")
    if not model.get("chat_template_kwargs"):  # none (all but Qwen3): the SFT models cached before stay valid
        model.pop("chat_template_kwargs", None)
    data = stage_settings(cfg.data, schema_of(cfg.data, DATA_SCHEMAS), "sft")
    return {"model": model, "data": data, "seed": cfg.sft.seed}


def base_tokenizer(cfg):
    if cfg.model.path is None:
        return build_word_tokenizer(DictionaryTask.from_config(cfg.data).words)
    return load_tokenizer(cfg.model, resolve_model_source(cfg.model))


def base_model(cfg, tokenizer):
    """The model SFT starts from: the tiny model built from scratch, or a real base model (loaded after the stage's
    TrainingArguments exist: onto this rank's GPU, or partitioned under ZeRO-3)."""
    if cfg.model.path is None:
        return build_tiny_model(cfg.model.arch, tokenizer, cfg.sft.seed)
    return load_model(resolve_model_source(cfg.model), cfg.model)


class ResumableSFTTrainer(ExactResumeMixin, SFTTrainer):
    """SFTTrainer whose resume restores every weight (GPTNeoX's output head included)."""


def demonstrations(cfg, tokenizer):
    return task_of(cfg).sft_data(cfg, tokenizer)


def train_sft(cfg, out_dir: Path) -> None:
    """Train into `out_dir` (the cache-build folder), resuming from the checkpoint a killed build left there."""
    metrics_file = out_dir / "sft_metrics.json"  # written last: a build killed after it has only to clean up
    if not metrics_file.exists():
        _train_sft(cfg, out_dir, metrics_file)
    if distributed.is_main():
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def _train_sft(cfg, out_dir: Path, metrics_file: Path) -> None:
    checkpoint_root = out_dir / "checkpoints"
    resume, callbacks = build_checkpointing(cfg, checkpoint_root, "kill_at_sft_step")
    tokenizer = base_tokenizer(cfg)
    dataset = demonstrations(cfg, tokenizer)
    args = SFTConfig(
        **trainer_kwargs(cfg.model.sft, cfg, stage="sft", output_dir=str(checkpoint_root), report_to=[]),
        max_length=cfg.model.max_length,
        packing=False,
        dataset_num_proc=None,
    )
    model = base_model(cfg, tokenizer)
    counter = StepCounter()
    trainer = ResumableSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  callbacks=[*callbacks, counter])
    start = resumed_step(resume)  # before training: only the newest checkpoint is kept
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(out_dir))  # every rank: under ZeRO-3 the weights are gathered to rank 0 to be saved
    distributed.end_of_training()
    if not distributed.is_main():
        return
    tokenizer.save_pretrained(str(out_dir))
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "examples": len(dataset),
               "resumed_from_step": start, "steps_in_this_job": counter.steps,
               "torch_threads": torch.get_num_threads()}
    metrics_file.write_text(json.dumps(metrics, indent=2))
    log.info("SFT done: %s", metrics)


def sft_model_dir(cfg) -> Path:
    """The trained SFT model (cached): what PO starts from unless `sft.enabled=false`."""
    return cached(cfg.paths.cache_dir, "sft", sft_key(cfg), lambda out: train_sft(cfg, out), collective=True,
                  resumable=True)


def save_base_model(cfg, out_dir: Path) -> None:
    """The base model with the tokenizer every later stage reads (chat template fixed, pad token set), saved as
    they read an SFT folder. The tiny model: freshly built, untrained (the weights SFT would start from). A real
    model: its weights as published (their own dtype), so the folder's tokenizer carries the run's chat format."""
    tokenizer = base_tokenizer(cfg)
    if cfg.model.path is None:
        model = build_tiny_model(cfg.model.arch, tokenizer, cfg.sft.seed)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve_model_source(cfg.model), dtype="auto",
                                                     trust_remote_code=cfg.model.trust_remote_code)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def base_model_dir(cfg) -> Path:
    """The base model as a folder (cached, stage `base`, keyed like SFT): policy start and reference of a run
    without SFT (Fig. 8 b, c)."""
    return cached(cfg.paths.cache_dir, "base", sft_key(cfg), lambda out: save_base_model(cfg, out))


def start_model_dir(cfg) -> Path:
    """The model PO starts from and measures against (reference log-probs, KL, the win rate's reference): the SFT
    model, or with `sft.enabled=false` the base model. Call on every rank (SFT is a collective build)."""
    if cfg.sft.enabled:
        return sft_model_dir(cfg)
    log.info("sft.enabled=false: the base model is policy start and reference (no SFT)")
    return base_model_dir(cfg)


def reference_kind(cfg) -> str:
    """What the run's reference (and its win rate's opponent) is: `sft` or `base`."""
    return "sft" if cfg.sft.enabled else "base"


def task_sft_dir(cfg, start_dir: Path) -> Path:
    """The SFT model the embedded task's data come from (its preference pairs, its learned reward model).

    Decision (Fig. 8 without SFT): those data are the task's fixed data set, the role UltraFeedback and the reward
    model play for real models, which do not change when PO starts from the base model. So a run without SFT
    trains on the same pairs, sampled from the SFT model, as its twin with SFT: only the starting point differs.
    Sampling them from the untrained tiny model would give pairs of random words, a different task. Call on every
    rank first (pipeline) when SFT may still have to be trained; afterwards the cached folder comes back at once."""
    return start_dir if cfg.sft.enabled else sft_model_dir(cfg)
