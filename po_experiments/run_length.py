"""A PO run's length in its own step unit, and the check that every step-valued setting falls inside it.

The paper's step numbers are taken literally, in the unit the trainers count (README "Paper presets"):
- DPO family: one optimizer step = `model.dpo.batch_size` pairs (Pythia: 16 pairs = the paper's "batch size 32"
  read as sequences, so its 2 epochs are 7,642 steps and every step number of the paper lies inside them);
- PPO family: one update = a rollout of `model.ppo.batch_size` responses (prompts x `algo.group_size`, 1 for PPO)
  followed by the PPO epochs on it (TRL's step; TRL's "episodes" are these responses).

`check(cfg, rows)` runs twice: at validation with the data's known size (`data.<source>.rows`, the dry-run plan's
numbers) and again when training starts with the rows actually loaded (the embedded task's pair count is known only
once sampled; real data may lose a few rows to validation).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import write_json
from .errors import ConfigError
from .objectives import objective_of
# cDPO's ramp may end after the run does, as the paper's Pythia case 3 does ((3000, 8000) in a 7,642-step run:
# UltraFeedback's 63,967 prompts at 16 pairs per step would give 7,996): lambda must still reach this by the end.
from .objectives.pairwise import MIN_FINAL_LAMBDA  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass
class StepSetting:
    key: str
    value: float
    inside: bool
    rule: str


def stage(cfg) -> str:
    """The model section holding the run's training settings: its family's (model.dpo / model.ppo)."""
    return cfg.algo.family


def optimizer_steps(hp, rows: int | None) -> int | None:
    """transformers' Trainer: ceil(epochs x steps per epoch), a last partial batch being a step."""
    if hp.max_steps > 0:
        return hp.max_steps
    return None if rows is None else max(1, math.ceil(hp.epochs * math.ceil(rows / hp.batch_size)))


def ppo_updates(hp, rows: int | None, group_size: int = 1) -> int | None:
    """TRL's PPOTrainer: episodes = int(epochs x prompts) x responses per prompt, updates = ceil(episodes / batch)
    (the batch counts responses: batch / group_size prompts per update)."""
    if hp.max_steps > 0:
        return hp.max_steps
    return None if rows is None else max(1, math.ceil(int(hp.epochs * rows) * group_size / hp.batch_size))


def group_size(cfg) -> int:
    """Responses per prompt of a PPO-family run's rollouts (1 for PPO)."""
    from .objectives.policy_gradient import group_size as of_algo

    return of_algo(cfg.algo)


def total_steps(cfg, rows: int | None) -> int | None:
    """The PO run's optimizer steps (DPO family) or updates (PPO family), or None when the rows are unknown."""
    if stage(cfg) == "ppo":
        return ppo_updates(cfg.model.ppo, rows, group_size(cfg))
    return optimizer_steps(cfg.model.dpo, rows)


def unit(cfg) -> str:
    hp = cfg.model[stage(cfg)]
    if stage(cfg) == "ppo":
        k = group_size(cfg)
        rollout = f"{hp.batch_size} prompts" if k == 1 else \
            f"{hp.batch_size} responses ({hp.batch_size // k} prompts x {k})"
        return (f"PPO update: a rollout of {rollout}, then {cfg.algo.num_ppo_epochs} PPO epoch(s) of "
                f"{cfg.algo.num_mini_batches} mini-batch(es) on it")
    return f"optimizer step on {hp.batch_size} pairs ({2 * hp.batch_size} sequences)"


def _init_from_step(path: str | None) -> int | None:
    match = re.search(r"step-(\d+)/?$", str(path)) if path else None
    return int(match.group(1)) if match else None


def step_settings(cfg, total: int) -> list[StepSetting]:
    """Every step-valued setting of the run with whether it lies inside a run of `total` steps."""
    out: list[StepSetting] = []

    def add(key, value, inside, rule):
        if value is not None:
            out.append(StepSetting(key, value, bool(inside), rule))

    hp = cfg.model[stage(cfg)]
    if hp.save_steps:
        add(f"model.{stage(cfg)}.save_steps", hp.save_steps, hp.save_steps < total,
            "a checkpoint before the end (G and win-rate curves need more than the final model)")
    from .controllers import active

    for key, value, inside, rule in objective_of(cfg.algo).schema.step_settings(cfg.algo, total):
        if active(cfg) and key in ("t1", "t2", "t3"):
            continue  # a controller's lambda replaces the t1/t2 (hPPO: t3) schedule (controllers/)
        add(f"algo.{key}", value, inside, rule)  # the objective's own step-valued settings (its schema says which)
    ab = cfg.ablation
    if ab.name != "none":
        add("ablation.start_step", ab.start_step, ab.start_step < total, "the ablation starts inside the run")
        add("ablation.stop_step", ab.stop_step, ab.stop_step is None or ab.stop_step <= total,
            "the ablation window ends inside the run")
        start = _init_from_step(ab.init_from)
        add("ablation.init_from", start, (start or 0) < total, "the checkpoint continued from is before the run's end")
    return out


def check_training(cfg, rows: int, run_dir) -> dict:
    """The check on the rows a PO stage actually trains on, written to `run_length.json` for summary.json."""
    from . import distributed  # imported here: the plan (and so the config's validation) imports this module

    record = check(cfg, rows, where="the training data")
    if not distributed.is_main():
        return record
    write_json(Path(run_dir) / "run_length.json", record)
    return record


def check(cfg, rows: int | None, *, where: str) -> dict:
    """The run's length and step settings (for plan.json / summary.json); a ConfigError naming every key outside
    the run (unless plan.check_steps=false: then a warning)."""
    if stage(cfg) == "ppo" and cfg.model.ppo.batch_size % group_size(cfg):
        raise ConfigError(f"model.ppo.batch_size: counts responses, must be whole groups of algo.group_size="
                          f"{group_size(cfg)}, got {cfg.model.ppo.batch_size}")
    total = total_steps(cfg, rows)
    record = {"stage": stage(cfg), "unit": unit(cfg), "steps": total, "rows": rows, "settings": []}
    if total is None:
        return record
    settings = step_settings(cfg, total)
    record["settings"] = [asdict(s) for s in settings]
    outside = [s for s in settings if not s.inside]
    if outside:
        message = "; ".join(f"{s.key}={s.value:g} lies outside the run: {s.rule}" for s in outside) + (
            f" [{where}: {total} steps of {record['unit']}, from {rows} rows; plan.check_steps=false runs anyway]")
        if cfg.plan.get("check_steps", True):
            raise ConfigError(message)
        log.warning(message)
    return record
