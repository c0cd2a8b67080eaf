"""W&B: one run per job, offline by default with its files inside the run dir (`<run dir>/wandb`)."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from .reporting.methods import describe

log = logging.getLogger(__name__)


def start(cfg, run_dir: Path):
    """Open the W&B run (resumed if this run dir had one) or return None when logging is off."""
    if not cfg.logger.enabled or cfg.logger.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]  # stable: a resumed job continues it
    run = wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group or cfg.name,
        name=f"{cfg.algo.name}-{cfg.model.name}-s{cfg.seed}-{run_dir.name}"[:128], id=run_id, resume="allow",
        dir=str(run_dir), mode=cfg.logger.mode, job_type="train",
        config={**OmegaConf.to_container(cfg, resolve=True), **describe(cfg)},  # method: the report groups by it
    )
    log.info("W&B run %s (%s) in %s", run.id, cfg.logger.mode, run_dir / "wandb")
    return run


def report_to(run) -> list[str]:
    """What the HF Trainer reports to: its WandbCallback reuses the run opened by `start`."""
    return ["wandb"] if run is not None else []


def finish(run, summary: dict) -> None:
    if run is None:
        return
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
    run.log({f"final/{k}": v for k, v in scalars.items()})
    run.summary.update(scalars)
    run.finish()
