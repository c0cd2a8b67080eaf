"""Smoke test of scripts/bench_alignment.py: both families run end to end on the tiny model and report all three
methods, agreeing on G(TOT, all).

Timings are noisy, so nothing here asserts on the ratio's value, only that it is there and finite.
"""
from __future__ import annotations

import json
import math

import pytest

from conftest import load_script



def load_bench():
    return load_script("bench_alignment")


@pytest.mark.parametrize("family, size", [("dpo", ["--pairs", "16"]), ("ppo", ["--rollout", "12"])])
def test_alignment_bench_runs_and_methods_agree(tmp_path, family, size):
    out = tmp_path / "bench.json"
    argv = ["--family", family, "--model", "tiny", *size, "--dprime", "8", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--threads", "1", "--out", str(out)]
    assert load_bench().main(argv) == 0

    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"tot_only", "full", "per_component"}
    for stats in res["methods"].values():
        assert stats["n"] == 1 and stats["median_s"] > 0
        assert len(stats["times_s"]) == 1 and all(t > 0 for t in stats["times_s"])
        assert 0 < stats["dprime_median_s"] < stats["median_s"]  # every method includes the D' pass
    for key in ("full/tot_only", "full/per_component"):
        assert math.isfinite(res["ratios"][key]) and res["ratios"][key] > 0
    assert res["ratio"] == res["ratios"]["full/tot_only"]
    assert res["verdict"] in {"PASS", "ABOVE TARGET"}

    agree = res["agreement"]
    for method in ("tot_only", "per_component"):
        entry = agree[method]
        for key in ("per_batch_G_rel", "G_filtered_rel", "G_unfiltered_rel", "norm_rel"):
            assert entry[key] < 1e-4, (method, key, entry[key])
        assert entry["same_outliers"] is True
    if family == "dpo":  # every component and layer group, and every component's norm
        assert agree["per_component"]["all_components_G_rel"] < 1e-4
        assert agree["per_component"]["all_components_norm_rel"] < 1e-4
    assert agree["full_G_tot_all"]["n_batches"] == (4 if family == "dpo" else 2)


def test_csv_output(tmp_path):
    out = tmp_path / "bench.csv"
    argv = ["--pairs", "8", "--dprime", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "1",
            "--out", str(out)]
    assert load_bench().main(argv) == 0
    lines = out.read_text().strip().splitlines()
    assert lines[0].startswith("family,model,method,median_s")
    assert [line.split(",")[2] for line in lines[1:]] == ["tot_only", "full", "per_component"]


def test_ghost_method_against_vmap(tmp_path):
    """`--method ghost --compare-vmap`: the full analysis by hooks reproduces the vmap path (every component x group
    G and every norm), reports every component's norm and each method's peak memory."""
    out = tmp_path / "bench.json"
    argv = ["--pairs", "8", "--dprime", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "1",
            "--method", "ghost", "--compare-vmap", "--methods", "tot_only", "full", "--out", str(out)]
    assert load_bench().main(argv) == 0
    res = json.loads(out.read_text())
    assert res["config"]["full_method"] == "ghost" and set(res["methods"]) == {"tot_only", "full"}
    assert all(s["peak_gb"] >= 0 for s in res["methods"].values())
    agree = res["agreement"]
    assert agree["full_norms_present"] == ["TOT", "POS", "NEG", "TOP", "MID", "BOT"]
    assert agree["vmap"]["all_components_G_rel"] < 1e-5 and agree["vmap"]["all_components_norm_rel"] < 1e-5


@pytest.mark.parametrize("family, size", [("dpo", ["--pairs", "8"]), ("ppo", ["--rollout", "6"])])
def test_five_targets_against_tot_only(tmp_path, family, size):
    """`--targets 5`: the full method measures G against five targets in its pass (its g' passes timed with it),
    reports t5/t1 and the per-target ratio, and still agrees with TOT-only on D'."""
    out = tmp_path / "bench.json"
    argv = ["--family", family, *size, "--dprime", "4", "--targets", "5", "--n-target", "4", "--repeats", "1",
            "--warmup", "0", "--device", "cpu", "--threads", "1", "--methods", "tot_only", "full", "--out", str(out)]
    assert load_bench().main(argv) == 0
    res = json.loads(out.read_text())
    r = res["ratios"]
    assert r["full_targets/tot_only_1"] == res["ratio"] and r["per_target"] == pytest.approx(res["ratio"] / 5)
    assert res["agreement"]["tot_only"]["per_batch_G_rel"] < 1e-4
