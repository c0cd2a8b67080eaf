"""Smoke test of scripts/bench_dpo_step.py: it runs end to end on the tiny model and writes usable results.

Timings are noisy, so nothing here asserts on the ratio's value, only that it is there and finite.
"""
from __future__ import annotations

import json
import math

from conftest import load_script



def load_bench():
    return load_script("bench_dpo_step")


def test_bench_runs_and_reports_both_trainers(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--model", "tiny", "--batch", "8", "--steps", "3", "--warmup", "1", "--repeats", "2",
            "--components", "POS,NEG", "--device", "cpu", "--threads", "1", "--out", str(out)]
    assert load_bench().main(argv) == 0

    res = json.loads(out.read_text())
    assert set(res["trainers"]) == {"stock", "ours"}
    for stats in res["trainers"].values():
        assert stats["n_steps"] == 2 * 3
        assert len(stats["step_times_ms"]) == 6 and all(t > 0 for t in stats["step_times_ms"])
        assert stats["median_ms"] > 0 and stats["iqr_ms"] >= 0
    assert math.isfinite(res["ratio"]) and res["ratio"] > 0
    assert len(res["per_repeat_ratio"]) == 2
    assert res["verdict"] in {"PASS", "ABOVE TARGET"}
    assert res["compute_loss_exercised"] is True
    assert res["config"]["components"] == ["POS", "NEG"]
