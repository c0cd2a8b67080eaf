"""Win rate against the SFT model: ties count one half; the standard error is the sample one."""
from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from po_experiments.config import SyntheticDataConfig
from po_experiments.stages.evaluate import EvalPrompts, judge_gold, win_rate


def test_win_rate_by_hand():
    verdicts = [{"preference": p} for p in (2.0, 1.0, 1.5, 2.0)]  # win, loss, tie, win
    rate, se = win_rate(verdicts)
    assert rate == pytest.approx(62.5)
    scores = [1, 0, 0.5, 1]
    var = sum((s - 0.625) ** 2 for s in scores) / 3
    assert se == pytest.approx(100 * math.sqrt(var / 4))


def test_gold_judge_prefers_the_right_answer_and_ties_equal_ones():
    cfg = OmegaConf.create({"data": OmegaConf.structured(SyntheticDataConfig)})
    prompts = ["<user> s1 s2 <assistant>"] * 3
    ep = EvalPrompts(prompts, prompts, ["synthetic"] * 3, 4)
    verdicts = judge_gold(cfg, ep, reference=["t2 t2", "t1 t2", "t1 t2"], candidate=["t1 t2", "t2 t2", "t1 t2 <eos>"])
    assert [v["preference"] for v in verdicts] == [2.0, 1.0, 1.5]
    assert win_rate(verdicts)[0] == pytest.approx(50.0)
