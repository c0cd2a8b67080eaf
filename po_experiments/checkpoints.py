"""Checkpoints under `checkpoints/step-<N>/`, complete or absent, and resuming from the last one.

transformers' Trainer writes `checkpoint-<N>` in place; once it has finished writing we rename it to `step-<N>`
(an atomic rename), so a run killed mid-save leaves at most a stray `checkpoint-<N>` that resume ignores and
deletes. Each checkpoint also gets `record.json` with the step and the training loss logged at that step.
The DPO/PPO stages keep every checkpoint (each is analysed); the cached SFT and reward-model builds keep the last
one only, saved every k steps and every T minutes of wall time, to resume after a kill or a SLURM requeue.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from . import distributed
from .atomic import replace_dir

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
    """Renames each finished Trainer checkpoint to step-<N> and records its step and training loss.

    `keep_last`: delete all but the newest k checkpoints once a new one is complete (None keeps every one)."""

    def __init__(self, checkpoint_root: Path, keep_last: int | None = None):
        self.root = Path(checkpoint_root)
        self.keep_last = keep_last
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
        replace_dir(written, self.root / f"step-{step}")
        if self.keep_last:
            for old in list(step_dirs(self.root))[:-self.keep_last]:
                shutil.rmtree(self.root / f"step-{old}", ignore_errors=True)


class WallClockSaves(TrainerCallback):
    """Ask the Trainer for a checkpoint once `minutes` of wall time have passed since the last one (or the start),
    so that a kill or a preemption loses at most that much work whatever the step time is.

    In a multi-process job rank 0's clock decides for every rank (a checkpoint is a collective save)."""

    def __init__(self, minutes: float, clock=time.monotonic):
        self.interval = minutes * 60
        self.clock = clock
        self.last = clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        due = distributed.broadcast(self.clock() - self.last >= self.interval)
        if due and not control.should_training_stop:  # the Trainer saves the final model itself
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = self.clock()


def build_signature_mismatch(checkpoint_root: Path, signature: dict) -> str | None:
    """Why the checkpoints under `checkpoint_root` cannot be resumed by a job of this shape, or None.

    DeepSpeed's optimizer shards and the per-rank RNG and data positions depend on the process count, so a
    checkpoint is resumed only by a job with the same `signature` (e.g. processes and DeepSpeed config)."""
    written = checkpoint_root / "signature.json"
    if not written.exists():
        return None
    found = json.loads(written.read_text())
    return None if found == signature else f"written by a job with {found}, this job has {signature}"


def resume_point(checkpoint_root: Path, signature: dict) -> Path | None:
    """The newest complete checkpoint of a killed build to resume from, or None to start from step 0.

    Checkpoints of a job of another shape are discarded (logged): starting over is slower but always right."""
    checkpoint_root = Path(checkpoint_root)
    reason = build_signature_mismatch(checkpoint_root, signature)
    if reason:
        log.warning("discarding the checkpoints in %s: %s", checkpoint_root, reason)
        shutil.rmtree(checkpoint_root)
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    (checkpoint_root / "signature.json").write_text(json.dumps(signature, indent=2, sort_keys=True))
    return last_checkpoint(checkpoint_root)



class KillAtStep(TrainerCallback):
    """SIGKILL the process after optimizer step N, as a node failure would (debug.kill_at_step, resume tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            log.warning("debug.kill_at_step=%d: killing this process with SIGKILL", self.step)
            os.kill(os.getpid(), signal.SIGKILL)


def debug_callbacks(cfg, key: str = "kill_at_step") -> list[TrainerCallback]:
    """Debug hooks of a training stage: `debug.kill_at_step` (DPO/PPO), `kill_at_sft_step`, `kill_at_reward_step`."""
    step = cfg.debug[key]
    return [KillAtStep(step)] if step else []


class StepCounter(TrainerCallback):
    """Optimizer steps taken in this process (a resumed build reports how much it had left to do)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def build_checkpointing(cfg, checkpoint_root: Path, debug_key: str) -> tuple[Path | None, list[TrainerCallback]]:
    """Checkpoints of a training stage that runs inside a cache build (SFT, reward model): where to resume from,
    and the callbacks that keep the newest checkpoint only, also saved every `runtime.checkpoint_every_min`
    minutes, plus the stage's debug kill hook. Called on every rank; rank 0 looks at the folder."""
    signature = {"processes": distributed.world(), "deepspeed": cfg.deepspeed.name}
    resume = distributed.main_first(lambda: resume_point(checkpoint_root, signature))
    callbacks = [StepCheckpoints(checkpoint_root, keep_last=1), *debug_callbacks(cfg, debug_key)]
    if cfg.runtime.checkpoint_every_min > 0:
        callbacks.append(WallClockSaves(cfg.runtime.checkpoint_every_min))
    if resume is not None:
        log.info("resuming from %s", resume)
    return resume, callbacks


def resumed_step(resume: Path | None) -> int:
    return json.loads((resume / "record.json").read_text())["step"] if resume else 0
