"""Preference pairs: two SFT samples per prompt labelled by the gold reward (synthetic, cached), or UltraFeedback.

The synthetic pairs come from the SFT model even in a run without SFT (`sft.task_sft_dir`): they are the task's data
set, as UltraFeedback is for real models."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from ..cache import cached
from ..data.synthetic import DictionaryTask
from ..models import load_for_inference
from .common import generate
from ..config import DATA_SCHEMAS, schema_of, stage_settings
from .sft import sft_key, task_sft_dir
from ..tasks import task_of

log = logging.getLogger(__name__)


def sample_pairs(cfg, sft_dir: Path, out_dir: Path) -> None:
    task = DictionaryTask.from_config(cfg.data)
    model, tokenizer = load_for_inference(sft_dir, cfg.model.dtype)
    seed = cfg.sft.seed  # the pairs are the task's data set: one per SFT model, shared by every PO seed
    prompts = task.preference_prompts(cfg.data.n_pref_prompts, seed)
    kw = dict(max_new_tokens=cfg.data.max_new_tokens, batch_size=256, temperature=cfg.data.sample_temperature)
    a = generate(model, tokenizer, prompts, seed=seed, desc="sampling pairs (a)", **kw)
    b = generate(model, tokenizer, prompts, seed=seed + 1, desc="sampling pairs (b)", **kw)
    pairs = task.label_pairs(prompts, a, b, scale=cfg.data.label_scale, flip_p=cfg.data.label_flip_p, seed=seed)
    pairs.save_to_disk(str(out_dir / "pairs"))
    agree = np.mean(np.array(pairs["gold_chosen"]) > np.array(pairs["gold_rejected"]))
    stats = {"prompts": len(prompts), "pairs": len(pairs), "dropped_identical": len(prompts) - len(pairs),
             "chosen_better_by_gold": float(agree)}
    (out_dir / "pairs_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("preference pairs: %s", stats)


def pair_settings(cfg) -> dict:
    """The data settings the synthetic pairs read beyond the SFT model's (fields marked read_by("pairs"))."""
    return stage_settings(cfg.data, schema_of(cfg.data, DATA_SCHEMAS), "pairs", marked_only=True)


def pair_key(cfg) -> dict:
    """What determines the synthetic pairs: the SFT model they are sampled from and the settings they read."""
    return {"sft": sft_key(cfg), "pairs": pair_settings(cfg)}


def preference_data(cfg, sft_dir: Path, tokenizer) -> Dataset:
    """The training pairs; `sft_dir` is the model the run starts from (the SFT model, or the base model)."""
    if task_of(cfg).embedded:  # labelled from the SFT model's own samples by the gold reward
        source = task_sft_dir(cfg, sft_dir)
        folder = cached(cfg.paths.cache_dir, "pairs", pair_key(cfg), lambda out: sample_pairs(cfg, source, out))
        return load_from_disk(str(folder / "pairs")).select_columns(["prompt", "chosen", "rejected"])
    from ..data.paper import load_preferences

    return load_preferences(cfg.data, tokenizer).select_columns(["prompt", "chosen", "rejected"])
