"""Ablations: which components are removed from the training objective at optimizer step t.

A new ablation is one `@register_ablation` function (step, cfg) -> components to drop, plus a YAML in
`conf/ablation/`.
"""
from __future__ import annotations

from ..registry import registry

ABLATIONS, register_ablation = registry("ablation")



@register_ablation("none")
def no_ablation(step: int, cfg) -> list[str]:
    return []


@register_ablation("drop_window")
def drop_window(step: int, cfg) -> list[str]:
    """Drop `cfg.drop` for steps in [start_step, stop_step): the paper's DPO w/o NEG before 3000 steps
    (stop_step=3000) and w/o POS after 6000 (start_step=6000), PPO w/o TOP / w/o MID (whole run)."""
    inside = step >= cfg.start_step and (cfg.stop_step is None or step < cfg.stop_step)
    return list(cfg.drop) if inside else []
