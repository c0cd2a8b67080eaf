"""DeepSpeed ZeRO on CPU with 2 processes over gloo (torchrun), against the same run in 1 process.

- ZeRO-2 and ZeRO-3 DPO follow the 1-process loss trajectory (same global batch of 64, same data order);
- G computed under ZeRO-3 from parameter shards equals G computed in one process on the same checkpoints;
- the PPO family trains under ZeRO-2 and ZeRO-3 through the whole pipeline (checkpoints hold whole weights).
The first launch JIT-builds DeepSpeed's small CPU communication op (about a minute, then cached).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import REPO
from po_experiments.checkpoints import step_dirs

pytestmark = pytest.mark.slow

# Trajectories: per-step DPO loss of 2 processes vs 1. Gradients are the same average over the same 64 pairs,
# summed in another order (all-reduce), so runs differ by float32 rounding that 8 AdamW steps barely amplify.
LOSS_TOLERANCE = 1e-4
G_RELATIVE_TOLERANCE = 1e-4

FAST = ["runtime.threads=1", "model.sft.max_steps=40", "model.dpo.max_steps=8", "model.dpo.save_steps=4",
        "model.dpo.logging_steps=1", "eval.n_prompts=32", "analysis.n_pairs=24", "analysis.n_dprime=16"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(run_dir, overrides, nproc: int, cache_dir, extra_env=None) -> subprocess.CompletedProcess:
    head = [sys.executable, "run.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", _port(),
        "run.py"]
    env = {**os.environ, "PO_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.run([*head, *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(run_dir) -> list[float]:
    history = json.loads((run_dir / "model" / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    cache = root / "cache"
    out = {}
    # zero2 first: its 2 processes build the shared SFT model together (a collective cache build)
    for name, nproc, ds in (("zero2", 2, "zero2"), ("single", 1, "none"), ("zero3", 2, "zero3")):
        launch(root / name, [*FAST, f"deepspeed={ds}"], nproc, cache)
        out[name] = root / name
    out["cache"] = cache
    return out


def test_zero2_and_zero3_follow_the_single_process_trajectory(runs):
    reference = losses(runs["single"])
    assert len(reference) == 8
    for stage in ("zero2", "zero3"):
        got = losses(runs[stage])
        assert len(got) == len(reference), stage
        worst = max(abs(a - b) for a, b in zip(got, reference))
        print(f"{stage}: max |loss - 1-process loss| over 8 steps = {worst:.2e}")
        assert worst < LOSS_TOLERANCE, f"{stage}: {got} vs {reference} (max diff {worst:.2e})"
        summary = json.loads((runs[stage] / "summary.json").read_text())
        assert summary["final_step"] == 8 and summary["win_rate"] is not None
        assert sorted(step_dirs(runs[stage] / "checkpoints")) == [4, 8]


def test_g_under_zero3_equals_single_process_g(runs, tmp_path):
    """The ZeRO-3 run's alignment.csv came from shards on 2 ranks; recompute it in one process (vmap, whole
    gradients) on the same checkpoints, the same D' answers and the same sampled pairs."""
    sharded = pd.read_csv(runs["zero3"] / "alignment.csv")
    copy = tmp_path / "zero3_single"
    shutil.copytree(runs["zero3"], copy, ignore=shutil.ignore_patterns("alignment*.csv", "wandb"))
    env = {**os.environ, "PO_CACHE_DIR": str(runs["cache"]), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "scripts/analyse_run.py", str(copy), "deepspeed.name=none",
                    "deepspeed.config=null", "runtime.threads=1"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    single = pd.read_csv(copy / "alignment.csv")
    keys = ["step", "target", "component", "layer_group"]  # G against every target of analysis.targets
    both = sharded.merge(single, on=keys, suffixes=("_sharded", "_single"))
    assert len(both) == len(single) == len(sharded) == 2 * 5 * 6 * 4
    assert (both["n_outliers_sharded"] == both["n_outliers_single"]).all()
    for column in ("G", "G_unfiltered", "grad_norm", "target_logp"):
        a, b = both[f"{column}_sharded"], both[f"{column}_single"]
        scale = b.abs().groupby(both["step"]).transform("max")  # components near 0 are judged at the step's scale
        rel = ((a - b).abs() / scale).max()
        print(f"G under ZeRO-3 vs 1 process, {column}: max relative error {rel:.2e}")
        assert rel < G_RELATIVE_TOLERANCE, f"{column}: max relative error {rel:.2e}"


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ppo_trains_under_zero(zero, tmp_path):
    """Under ZeRO-3 policy, value and reference model are partitioned from the load on; checkpoints gather them."""
    run_dir = tmp_path / "ppo"
    launch(run_dir, ["algo=ppo", f"deepspeed={zero}", "runtime.threads=1", "model.sft.max_steps=40",
                     "model.ppo.max_steps=4", "model.ppo.save_steps=2", "eval.n_prompts=16", "analysis.n_dprime=12"],
           2, tmp_path / "cache")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 4 and summary["algo"] == "ppo"
    steps = pd.read_csv(run_dir / "alignment.csv")["step"].unique().tolist()
    assert sorted(steps) == [2, 4]
    assert len(losses(run_dir)) == 4
    # checkpoints and the final model hold whole weights (gathered under ZeRO-3), and training moved them
    loaded = {}
    for name, folder in (("step-2", run_dir / "checkpoints" / "step-2"), ("final", run_dir / "model")):
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
        loaded[name] = model.state_dict()
    _, info = AutoModelForSequenceClassification.from_pretrained(run_dir / "checkpoints" / "step-2" / "value",
                                                                 output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert max((loaded["final"][k] - v).abs().max().item() for k, v in loaded["step-2"].items()) > 0


def test_loss_check_under_zero_equals_single_process(runs):
    """App. A's loss check: each rank evaluates its share of the sample (ZeRO-3: the same number of forwards on
    every rank) and the sums are all-reduced, so L before / after the update that follows step 4 is the 1-process
    value (up to the trajectories' float32 rounding)."""
    single = json.loads((runs["single"] / "checkpoints" / "step-4" / "loss_check.json").read_text())
    for stage in ("zero2", "zero3"):
        got = json.loads((runs[stage] / "checkpoints" / "step-4" / "loss_check.json").read_text())
        for side in ("before", "after"):
            assert got[side] == pytest.approx(single[side], rel=LOSS_TOLERANCE), (stage, side, got, single)
        assert not (runs[stage] / "checkpoints" / "step-8" / "loss_check.json").exists()  # the final step
