"""The whole job: SFT (cached) -> preference data -> PO training with checkpoints -> win rate -> summary.json.

Re-running a finished run dir does nothing; an unfinished one resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from transformers import AutoTokenizer, set_seed

from . import tracking
from .analysis.stage import run_alignment
from .models import resolve_model_source, set_threads
from .stages.evaluate import evaluate
from .stages.pairs import preference_data
from .stages.policy import train_policy
from .stages.sft import sft_model_dir

log = logging.getLogger(__name__)


def preflight(cfg) -> None:
    """Checks that must fail in seconds rather than after an hour of SFT."""
    if cfg.model.path is not None:
        resolve_model_source(cfg.model)
    if cfg.algo.family == "ppo" and cfg.reward.kind == "classifier":
        from .rewards import resolve_reward_source

        resolve_reward_source(cfg.reward.path)


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run(cfg) -> dict:
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        log.info("run already finished (win rate %s): %s", summary.get("win_rate"), summary_path)
        return summary

    started = time.time()
    set_threads(cfg.runtime.threads)
    set_seed(cfg.seed)
    preflight(cfg)
    wandb_run = tracking.start(cfg, run_dir)

    sft_dir = sft_model_dir(cfg)
    if cfg.algo.family == "ppo":
        from .stages.ppo_policy import train_ppo_policy

        policy = train_ppo_policy(cfg, sft_dir, run_dir, tracking.report_to(wandb_run))
    else:
        train_data = preference_data(cfg, sft_dir, AutoTokenizer.from_pretrained(sft_dir))
        policy = train_policy(cfg, sft_dir, train_data, run_dir, tracking.report_to(wandb_run))
    result = evaluate(cfg, sft_dir, policy.model_dir, policy.final_step, run_dir)
    alignment = run_alignment(cfg, run_dir, sft_dir, wandb_run)

    summary = {
        "algo": cfg.algo.name, "model": cfg.model.name, "seed": cfg.seed, "ablation": cfg.ablation.name,
        "data": cfg.data.name, "final_step": policy.final_step, "final_loss": policy.final_loss,
        **result, "alignment": str(alignment) if alignment else None, "resumed_from": policy.resumed_from, "sft_dir": str(sft_dir),
        "wall_time_s": round(time.time() - started, 1),
    }
    write_json_atomic(summary_path, summary)
    tracking.finish(wandb_run, summary)
    log.info("summary: %s", summary_path)
    return summary
