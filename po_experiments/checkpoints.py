"""Checkpoints under `checkpoints/step-<N>/`, complete or absent, and resuming from the last one.

transformers' Trainer writes `checkpoint-<N>` in place; once it has finished writing we rename it to `step-<N>`
(an atomic rename), so a run killed mid-save leaves at most a stray `checkpoint-<N>` that resume ignores and
deletes. Each checkpoint also gets `record.json` with the step and the training loss logged at that step.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from . import distributed

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(checkpoint_root: Path) -> dict[int, Path]:
    if not checkpoint_root.is_dir():
        return {}
    found = {}
    for p in checkpoint_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "record.json").exists():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def last_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest complete checkpoint; half-written `checkpoint-*` folders from a killed save are removed."""
    if checkpoint_root.is_dir():
        for stray in checkpoint_root.glob("checkpoint-*"):
            log.warning("removing incomplete checkpoint %s (the run died while saving it)", stray)
            shutil.rmtree(stray, ignore_errors=True)
    dirs = step_dirs(checkpoint_root)
    return dirs[max(dirs)] if dirs else None


class StepCheckpoints(TrainerCallback):
    """Renames each finished Trainer checkpoint to step-<N> and records its step and training loss."""

    def __init__(self, checkpoint_root: Path):
        self.root = Path(checkpoint_root)
        self.last_loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank has written its part (DeepSpeed shards) before the folder is renamed
        if not state.is_world_process_zero:
            return
        step = state.global_step
        written = self.root / f"checkpoint-{step}"
        record = {"step": step, "loss": self.last_loss, "epoch": state.epoch}
        (written / "record.json").write_text(json.dumps(record, indent=2))
        target = self.root / f"step-{step}"
        if target.exists():  # re-saved after a resume at the same step: the new one is as good
            shutil.rmtree(target)
        os.replace(written, target)



class KillAtStep(TrainerCallback):
    """SIGKILL the process after optimizer step N, as a node failure would (debug.kill_at_step, resume tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            log.warning("debug.kill_at_step=%d: killing this process with SIGKILL", self.step)
            os.kill(os.getpid(), signal.SIGKILL)


def debug_callbacks(cfg) -> list[TrainerCallback]:
    return [KillAtStep(cfg.debug.kill_at_step)] if cfg.debug.kill_at_step else []
