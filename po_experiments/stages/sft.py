"""SFT stage: TRL's SFTTrainer on demonstrations (synthetic task or UltraChat-200k), cached per model/data/seed."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import OmegaConf
from trl import SFTConfig, SFTTrainer

from .. import distributed
from ..cache import cached
from ..data.synthetic import DictionaryTask
from ..models import build_tiny_model, build_word_tokenizer, load_model, load_tokenizer, resolve_model_source
from .common import trainer_kwargs

log = logging.getLogger(__name__)

# Data settings that only the preference pairs / evaluation read: changing them must not retrain SFT.
NOT_SFT_KEYS = {"n_pref_prompts", "sample_temperature", "label_scale", "label_flip_p", "n_heldout", "max_new_tokens",
                "preferences", "questions", "instructions", "num_proc"}


PO_KEYS = ("dpo", "cdpo", "ppo", "ppo_variants")  # model settings of later stages


def sft_key(cfg) -> dict:
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in PO_KEYS}
    if not model.get("chat_template_kwargs"):  # none (all but Qwen3): the SFT models cached before stay valid
        model.pop("chat_template_kwargs", None)
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in NOT_SFT_KEYS}
    return {"model": model, "data": data, "seed": cfg.seed}


def base_model_and_tokenizer(cfg):
    """The model SFT starts from: the tiny model built from scratch, or a real base model."""
    if cfg.model.path is None:
        task = DictionaryTask.from_config(cfg.data)
        tokenizer = build_word_tokenizer(task.words)
        return build_tiny_model(cfg.model.arch, tokenizer, cfg.seed), tokenizer
    source = resolve_model_source(cfg.model)
    return load_model(source, cfg.model), load_tokenizer(cfg.model, source)


def demonstrations(cfg, tokenizer):
    if cfg.data.name == "synthetic":
        return DictionaryTask.from_config(cfg.data).sft_dataset(cfg.data.n_sft, cfg.seed)
    from ..data.paper import load_sft

    return load_sft(cfg.data, tokenizer)


def train_sft(cfg, out_dir: Path) -> None:
    model, tokenizer = base_model_and_tokenizer(cfg)
    dataset = demonstrations(cfg, tokenizer)
    args = SFTConfig(
        **trainer_kwargs(cfg.model.sft, cfg, stage="sft", output_dir=str(out_dir / "trainer"), report_to=[]),
        max_length=cfg.model.max_length,
        packing=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(out_dir))  # every rank: under ZeRO-3 the weights are gathered to rank 0 to be saved
    distributed.end_of_training()
    if not distributed.is_main():
        return
    tokenizer.save_pretrained(str(out_dir))
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # the Trainer's scratch folder (no checkpoints)
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "examples": len(dataset)}
    (out_dir / "sft_metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("SFT done: %s", metrics)


def sft_model_dir(cfg) -> Path:
    return cached(cfg.paths.cache_dir, "sft", sft_key(cfg), lambda out: train_sft(cfg, out), collective=True)
