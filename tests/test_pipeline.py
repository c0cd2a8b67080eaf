"""`python run.py` end to end in a fast mode: the output contract, resume after SIGKILL, skip when finished."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# Small but real: SFT 40 steps, ~280 pairs, DPO ~17 steps of 16 pairs, checkpoints every 4 steps.
FAST = ["data.n_sft=2000", "model.sft.max_steps=40", "data.n_pref_prompts=300", "data.n_heldout=60",
        "model.dpo.batch_size=16", "model.dpo.epochs=1", "model.dpo.save_steps=4", "model.dpo.logging_steps=1",
        "runtime.threads=1", "analysis.n_pairs=40", "analysis.n_dprime=24"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one SFT model and one pair set for every run in this module


def run(run_dir: Path, cache_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PO_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "run.py", *FAST, *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "dpo"
    run(run_dir, cache_dir)
    return run_dir


def test_run_dir_follows_the_output_contract(finished):
    summary = json.loads((finished / "summary.json").read_text())
    for key in ("algo", "model", "seed", "final_step", "win_rate"):
        assert key in summary
    assert summary["algo"] == "dpo" and summary["model"] == "tiny" and summary["seed"] == 0
    assert 0 <= summary["win_rate"] <= 100 and summary["final_step"] > 0
    assert (finished / ".hydra" / "config.yaml").exists()

    steps = sorted(int(p.name.split("-")[1]) for p in (finished / "checkpoints").glob("step-*"))
    assert steps[:3] == [4, 8, 12] and steps[-1] == summary["final_step"]
    record = json.loads((finished / "checkpoints" / "step-8" / "record.json").read_text())
    assert record["step"] == 8 and isinstance(record["loss"], float)
    state = json.loads((finished / "checkpoints" / "step-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    # App. A's loss check: every checkpoint but the final one, about the update that follows it
    checks = {s: (finished / "checkpoints" / f"step-{s}" / "loss_check.json") for s in steps}
    assert all(checks[s].exists() for s in steps[:-1]) and not checks[steps[-1]].exists()
    check = json.loads(checks[8].read_text())
    assert check["step"] == 8 and check["before"] > 0 and check["after"] > 0 and "40 training pairs" in \
        check["measured_on"]
    alignment = pd.read_csv(finished / "alignment.csv")
    row = alignment[alignment["step"] == 8].iloc[0]
    assert (row["loss_before"], row["loss_after"]) == (check["before"], check["after"])
    assert bool(row["loss_increased"]) == (check["after"] > check["before"])
    assert alignment.loc[alignment["step"] == steps[-1], "loss_increased"].isna().all()  # unknown: kept
    assert summary["sft"] is True and summary["reference"] == "sft"

    table = pd.read_csv(finished / "win_rate.csv")  # a win rate at every checkpoint (Fig. 4's curves)
    assert {"judge", "step", "win_rate", "win_rate_se", "n"} <= set(table.columns)
    assert table["step"].tolist() == steps and set(table["judge"]) == {"gold"} and (table["n"] == 60).all()
    assert table["win_rate"].iloc[-1] == pytest.approx(summary["win_rate"], abs=1e-4)
    for name in ["reference"] + [f"step-{s}" for s in steps]:  # AlpacaEval's output format
        records = json.loads((finished / "eval" / "outputs" / f"{name}.json").read_text())
        assert len(records) == 60
        assert set(records[0]) == {"instruction", "output", "generator", "dataset", "index"}
    verdicts = json.loads((finished / "eval" / "gold" / f"step-{steps[-1]}.json").read_text())
    assert len(verdicts) == 60 and {"output_1", "output_2", "preference", "annotator"} <= set(verdicts[0])
    assert summary["method"] == "DPO" and summary["win_rates"] == {"gold": summary["win_rate"]}
    assert (finished / "figures" / "win_rate.png").exists()
    assert list((finished / "wandb").glob("offline-run-*"))  # W&B, offline, inside the run dir


def test_logged_metrics_include_the_paper_quantities(finished):
    history = json.loads((finished / "model" / "log_history.json").read_text())
    logged = set().union(*history)
    for key in ("loss", "omega/q33", "omega/q67", "rewards/margins", "components/pos_share"):
        assert key in logged


def test_rerunning_a_finished_run_does_nothing(finished, cache_dir):
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file() and "wandb" not in p.parts}
    proc = run(finished, cache_dir)
    assert "run already finished" in proc.stdout + proc.stderr
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [p for p in before if before[p] != after[p] and p.name != "run.log" and ".hydra" not in p.parts]
    assert not changed


def test_another_judge_reads_the_cached_outputs(finished, cache_dir, tmp_path, task):
    """A finished run judged again by a reward model: every checkpoint, nothing retrained or regenerated."""
    from po_experiments.models import build_word_tokenizer
    from test_rewards import save_tiny_rm

    run_dir = tmp_path / "rejudged"
    shutil.copytree(finished, run_dir)
    outputs = {p: p.stat().st_mtime_ns for p in (run_dir / "eval" / "outputs").iterdir()}
    rm = save_tiny_rm(tmp_path / "tiny_rm", build_word_tokenizer(task.words))
    run(run_dir, cache_dir, "eval.judge=reward_model", f"eval.reward_model.path={rm}")
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
    table = pd.read_csv(run_dir / "win_rate.csv")
    assert set(table["judge"]) == {"gold", "reward_model-tiny_rm"}
    steps = table.groupby("judge")["step"].apply(tuple)
    assert steps["gold"] == steps["reward_model-tiny_rm"] and len(steps["gold"]) >= 3  # the same checkpoints
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["win_rates"]) == {"gold", "reward_model-tiny_rm"} and summary["judge"] == "reward_model-tiny_rm"


def test_killed_run_resumes_to_the_same_result(finished, cache_dir, tmp_path):
    run_dir = tmp_path / "killed"
    killed = run(run_dir, cache_dir, "debug.kill_at_step=6", check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints" / "step-4").exists() and not (run_dir / "checkpoints" / "step-8").exists()

    run(run_dir, cache_dir)  # the same command (debug.* aside) picks up from step 4
    resumed, uninterrupted = json.loads((run_dir / "summary.json").read_text()), \
        json.loads((finished / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("step-4")
    assert resumed["final_step"] == uninterrupted["final_step"]
    assert resumed["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-6)
    a, b = weights(run_dir), weights(finished)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed["win_rate"] == uninterrupted["win_rate"]
    for check in (finished / "checkpoints").glob("step-*/loss_check.json"):  # the loss check resumes too
        again = json.loads((run_dir / "checkpoints" / check.parent.name / check.name).read_text())
        assert again["after"] == pytest.approx(json.loads(check.read_text())["after"], rel=1e-6)


@pytest.mark.parametrize("overrides", [
    ["algo=cdpo", "algo.t1=3", "algo.t2=12"],
    ["ablation=dpo_wo_neg_early", "ablation.stop_step=8"],
    ["ablation=dpo_wo_pos_late", "ablation.start_step=8", "logger=none"],
    ["algo.components=[TOP,MID]", "logger=none"],
])
def test_every_algorithm_and_ablation_runs(overrides, cache_dir, tmp_path):
    run(tmp_path / "run", cache_dir, *overrides)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["win_rate"] is not None and summary["final_step"] > 0


def test_continuing_from_another_runs_checkpoint(finished, cache_dir, tmp_path):
    """The paper's w/o POS: continue from DPO's checkpoint at T without positive learning."""
    source = finished / "checkpoints" / "step-8"
    run(tmp_path / "wo_pos", cache_dir, "ablation=dpo_wo_pos_late", "ablation.start_step=8",
        f"ablation.init_from={source}", "logger=none")
    summary = json.loads((tmp_path / "wo_pos" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-8")
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "wo_pos" / "checkpoints").glob("step-*"))
    assert saved[0] == 8 and len(saved) > 1  # nothing before step 8 was retrained (no step-4)
    history = json.loads((tmp_path / "wo_pos" / "model" / "log_history.json").read_text())
    share = {h["step"]: h["components/pos_share"] for h in history if "components/pos_share" in h}
    assert all(v == 1 for s, v in share.items() if s <= 8)  # inherited from the DPO run
    assert all(v == 0 for s, v in share.items() if s > 8) and max(share) > 8  # then no positive learning


def test_the_run_records_its_length_in_its_step_unit(finished):
    summary = json.loads((finished / "summary.json").read_text())
    length = summary["run_length"]
    assert summary["step_unit"] == length["unit"] == "optimizer step on 16 pairs (32 sequences)"
    assert length["steps"] == summary["final_step"] and length["rows"] > 0
    assert {s["key"]: s["inside"] for s in length["settings"]} == {"model.dpo.save_steps": True}


def test_po_seeds_share_one_sft_model(finished, cache_dir, tmp_path):
    """`seed` changes PO training only: every seed starts from (and is judged against) the one SFT model of
    `sft.seed`; another sft.seed builds another."""
    proc = run(tmp_path / "seed1", cache_dir, "seed=1", "logger=none")
    first, second = (json.loads((d / "summary.json").read_text()) for d in (finished, tmp_path / "seed1"))
    assert second["seed"] == 1 and second["sft_dir"] == first["sft_dir"]
    assert "SFT done" not in proc.stdout + proc.stderr  # not trained again
    assert any(not torch.equal(a, b) for a, b in zip(weights(finished).values(), weights(tmp_path / "seed1").values()))
    run(tmp_path / "sft1", cache_dir, "sft.seed=1", "logger=none", "analysis.enabled=false", "eval.checkpoints=final")
    assert json.loads((tmp_path / "sft1" / "summary.json").read_text())["sft_dir"] != first["sft_dir"]


# ------------------------------------------------------------------------------------------ the PPO family
PPO_FAST = ["algo=ppo", "model.ppo.batch_size=32", "model.ppo.save_steps=3", "model.ppo.logging_steps=1"]


@pytest.fixture(scope="module")
def finished_ppo(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "ppo"
    run(run_dir, cache_dir, *PPO_FAST, "logger=none")
    return run_dir


def test_ppo_run_writes_checkpoints_with_rollouts(finished_ppo):
    summary = json.loads((finished_ppo / "summary.json").read_text())
    assert summary["algo"] == "ppo" and summary["win_rate"] is not None
    steps = sorted(int(p.name.split("-")[1]) for p in (finished_ppo / "checkpoints").glob("step-*"))
    assert steps[:3] == [3, 6, 9] and steps[-1] == summary["final_step"]
    rollout = torch.load(finished_ppo / "checkpoints" / "step-3" / "rollout.pt", weights_only=True)
    for key in ("query_responses", "logprobs", "values", "scores", "rewards", "raw_advantages", "advantages"):
        assert key in rollout
    history = json.loads((finished_ppo / "model" / "log_history.json").read_text())
    logged = set().union(*history)
    for key in ("adv/TOP", "adv/MID", "adv/BOT", "adv_unwhitened/TOP", "tokens/pos_share", "tokens/neg_share", "ppo/policy"):
        assert key in logged


def test_killed_ppo_run_resumes_to_the_same_result(finished_ppo, cache_dir, tmp_path):
    run_dir = tmp_path / "killed"
    killed = run(run_dir, cache_dir, *PPO_FAST, "logger=none", "debug.kill_at_step=5", check=False)
    assert killed.returncode == -signal.SIGKILL and (run_dir / "checkpoints" / "step-3").exists()
    run(run_dir, cache_dir, *PPO_FAST, "logger=none")
    resumed = json.loads((run_dir / "summary.json").read_text())
    uninterrupted = json.loads((finished_ppo / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("step-3")
    assert resumed["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-5)
    a, b = weights(run_dir), weights(finished_ppo)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("overrides", [
    ["algo=cppo"], ["algo=cppo_mid"], ["algo=hppo"], ["ablation=ppo_wo_top"], ["reward=learned"],
])
def test_every_ppo_variant_runs(overrides, cache_dir, tmp_path):
    run(tmp_path / "run", cache_dir, *PPO_FAST, "logger=none", *overrides)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["win_rate"] is not None and summary["final_step"] > 0


# ------------------------------------------------------------------------------------------ the G analysis
def read_table(run_dir: Path):
    import pandas as pd

    return pd.read_csv(run_dir / "alignment.csv")


def assert_additive(table):
    """POS + NEG = TOT, TOP + MID + BOT = TOT, bottom + middle + top = all, for every step (rel. 1e-4)."""
    for column in ("G", "G_unfiltered"):
        g = table.pivot_table(index=["step", "target", "layer_group"], columns="component", values=column)
        scale = g.abs().max(axis=1) + 1e-12
        assert ((g["POS"] + g["NEG"] - g["TOT"]).abs() / scale).max() < 1e-4
        assert ((g["TOP"] + g["MID"] + g["BOT"] - g["TOT"]).abs() / scale).max() < 1e-4
        by_group = table.pivot_table(index=["step", "target", "component"], columns="layer_group", values=column)
        scale = by_group.abs().max(axis=1) + 1e-12
        assert ((by_group["bottom"] + by_group["middle"] + by_group["top"] - by_group["all"]).abs() / scale).max() < 1e-4


@pytest.mark.parametrize("fixture", ["finished", "finished_ppo"])
def test_alignment_table_covers_every_checkpoint(fixture, request):
    run_dir = request.getfixturevalue(fixture)
    table = read_table(run_dir)
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert len(steps) >= 3 and sorted(table["step"].unique()) == steps
    targets = ["dprime", "chosen", "rejected", "sft", "unrelated"]  # analysis.targets' default, every one there
    assert sorted(table["target"].unique()) == sorted(targets)
    assert len(table) == len(steps) * 5 * 6 * 4 and table["G"].notna().all() and table["target_logp"].notna().all()
    assert_additive(table)
    assert (table["n_batches"] > 0).all()
    import pandas as pd

    mb = pd.read_csv(run_dir / "alignment_minibatches.csv")
    assert not mb.duplicated(["step", "batch", "target", "component"]).any()
    attribution = pd.read_csv(run_dir / "attribution.csv")
    kept = attribution[~attribution["outlier_batch"]].groupby(["step", "target", "component"])["contribution"].sum()
    g = table[table["layer_group"] == "all"].set_index(["step", "target", "component"])["G"]
    assert ((kept - g.loc[kept.index]).abs() <= 1e-4 * g.abs().max()).all()  # the shares add up to G
    assert (run_dir / "examples.json").exists()
    for name in ("G_components", "G_filtering", "G_layers", "G_by_target", "grad_norms"):
        assert (run_dir / "figures" / f"{name}.png").stat().st_size > 5000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["alignment"].endswith("alignment.csv")


def test_killed_analysis_resumes_without_duplicates(finished, cache_dir, tmp_path):
    run_dir = tmp_path / "killed_analysis"
    killed = run(run_dir, cache_dir, "debug.kill_after_analysed=2", "logger=none", check=False)
    assert killed.returncode == -signal.SIGKILL
    assert read_table(run_dir)["step"].nunique() == 2 and not (run_dir / "summary.json").exists()
    run(run_dir, cache_dir, "logger=none")
    resumed, straight = read_table(run_dir), read_table(finished)
    assert len(resumed) == len(straight)
    assert resumed["G"].to_numpy() == pytest.approx(straight["G"].to_numpy(), rel=1e-5, abs=1e-9)


def test_finished_run_gains_g_and_other_analysis_settings_without_training(finished, cache_dir, tmp_path):
    """Analysis settings are no part of a run's identity: a run trained without G (a win-rate preset) asked for it
    later is analysed in its dir (alignment.csv, its own); asked for another D' (Fig. 7) it gains
    analysis_dprime-train-<hash>/ beside it; scripts/analyse_run.py with another sample size another folder;
    asked again for any of them, nothing is recomputed. Weights, checkpoints and win rates are never touched."""
    import pandas as pd

    run_dir = tmp_path / "trained_without_g"
    shutil.copytree(finished, run_dir, ignore=shutil.ignore_patterns("alignment*", "analysis*", "figures", "wandb"))
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "alignment": None}))
    trained = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()
               and {"model", "checkpoints", "eval"} & set(p.relative_to(run_dir).parts)}

    proc = run(run_dir, cache_dir, "logger=none")
    assert "run already finished; analysing" in proc.stdout + proc.stderr
    own = read_table(run_dir)
    pd.testing.assert_frame_equal(own[["step", "component", "layer_group"]],
                                  read_table(finished)[["step", "component", "layer_group"]])
    assert own["G"].to_numpy() == pytest.approx(read_table(finished)["G"].to_numpy(), rel=1e-5, abs=1e-9)
    assert json.loads((run_dir / "summary.json").read_text())["alignment"] == str(run_dir / "alignment.csv")

    run(run_dir, cache_dir, "logger=none", "analysis.dprime=train")
    (fig7,) = run_dir.glob("analysis_dprime-train-*")
    table = pd.read_csv(fig7 / "alignment.csv")
    assert set(table["dprime"]) == {"train"} and sorted(table["step"].unique()) == sorted(own["step"].unique())
    assert (fig7 / "figures" / "G_components.png").exists()
    pd.testing.assert_frame_equal(read_table(run_dir), own)  # the run's own table is untouched

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PO_CACHE_DIR": str(cache_dir)}
    subprocess.run([sys.executable, "scripts/analyse_run.py", str(run_dir), "analysis.n_pairs=16",
                    "runtime.threads=1"], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    folders = sorted(p.name for p in run_dir.glob("analysis_dprime-*"))
    assert len(folders) == 2 and sum(f.startswith("analysis_dprime-heldout-") for f in folders) == 1

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("alignment*.csv")}
    for extra in ((), ("analysis.dprime=train",)):
        proc = run(run_dir, cache_dir, "logger=none", *extra)
        assert "run already finished (" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
