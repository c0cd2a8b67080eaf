"""The two families of objectives as objects: which stage trains a run, what it needs first and where its
training settings live, chosen by `algo.family` (set by the objective's schema) instead of branches per module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    name: str  # algo.family, and model.<name>: the section holding its training settings
    title: str
    needs_task_model: Callable  # (cfg) -> whether the embedded task's pairs or reward model come from the SFT model
    trainer: str  # "module:function" (cfg, sft_dir, run_dir, report_to) -> TrainedPolicy, imported when used

    def train(self, cfg, sft_dir, run_dir, report_to):
        module, function = self.trainer.split(":")
        return getattr(importlib.import_module(module), function)(cfg, sft_dir, run_dir, report_to)

    def settings(self, cfg):
        """The model's training settings for this family (model.dpo / model.ppo)."""
        return cfg.model[self.name]


PAIRWISE = Family("dpo", "pairwise", lambda cfg: True, "po_experiments.stages.policy:train_pairwise")
POLICY_GRADIENT = Family("ppo", "policy gradient", lambda cfg: cfg.reward.kind == "learned",
                         "po_experiments.stages.ppo_policy:train_ppo_policy")
FAMILIES = {f.name: f for f in (PAIRWISE, POLICY_GRADIENT)}


def family_of(cfg) -> Family:
    return FAMILIES[cfg.algo.family]
