"""Figures of the gradient-alignment analysis, drawn from synthetic tables that follow the analysis stage's schemas."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from po_experiments.analysis.plots import (advantage_history, choose_linthresh, curve_data, draw_figures,
                                           excluded_steps, load_alignment, mean_norms, symlog_ticks)

COMPONENTS = ("TOT", "POS", "NEG", "TOP", "MID", "BOT")
LAYER_GROUPS = ("all", "bottom", "middle", "top")
G_FIGURES = {"G_components.png", "G_filtering.png", "G_layers.png"}

# per component: G at each of 5 checkpoints (sign changes, |G| from 1e-5 to 1e-1)
DPO_G = {
    "TOT": [3e-2, 8e-3, -2e-4, 1e-3, 5e-5],
    "POS": [6e-2, 2e-2, -4e-3, -1e-2, -3e-2],
    "NEG": [-3e-2, -1.2e-2, 3.8e-3, 1.1e-2, 3e-2],
    "TOP": [1e-2, -2e-3, 1e-5, 4e-4, -1e-1],
    "MID": [1.5e-2, 6e-3, -1e-4, 5e-4, 7e-2],
    "BOT": [5e-3, 4e-3, -1e-4, 1e-4, 3e-2],
}
DPO_STEPS = [0, 100, 200, 300, 400]
DPO_LOSS = [np.nan, 0.65, 0.67, 0.60, 0.62]  # rises at steps 200 and 400


def _alignment_table(steps, g, loss, family, ppo_norms_only_tot=False, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, step in enumerate(steps):
        increased = i > 0 and not np.isnan(loss[i - 1]) and loss[i] > loss[i - 1]
        for comp in COMPONENTS:
            for k, group in enumerate(LAYER_GROUPS):
                value = g[comp][i] * (1.0 if group == "all" else (0.2, 0.3, 0.5)[k - 1])
                norm = np.nan if (ppo_norms_only_tot and comp != "TOT") else float(rng.uniform(0.5, 2.0))
                rows.append({"step": step, "component": comp, "layer_group": group, "G": value,
                             "G_unfiltered": value * 3 - 1e-3, "n_batches": 12, "n_outliers": i % 3,
                             "grad_norm": norm, "loss": loss[i], "loss_before": 0.6,
                             "loss_after": 0.61 if increased else 0.59, "loss_increased": increased,
                             "algo_family": family})
    return pd.DataFrame(rows)


def _minibatch_table(steps, g, ppo=False, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, step in enumerate(steps):
        norms = rng.lognormal(0.0, 0.3, 12)
        norms[: i % 3] *= 50  # i % 3 outliers per step, as in the alignment table
        q1, q3 = np.quantile(norms, [0.25, 0.75])
        outlier = norms > q3 + 1.5 * (q3 - q1)
        for b in range(12):
            for comp in COMPONENTS:
                norm = norms[b] * (1.0 if comp == "TOT" else 0.5)
                if ppo and comp != "TOT":
                    norm = np.nan
                rows.append({"step": step, "batch": b, "component": comp, "grad_norm": norm,
                             "G": g[comp][i] + rng.normal(0, 1e-3), "outlier": bool(outlier[b])})
    return pd.DataFrame(rows)


@pytest.fixture
def dpo_run(tmp_path) -> Path:
    run = tmp_path / "dpo"
    run.mkdir()
    _alignment_table(DPO_STEPS, DPO_G, DPO_LOSS, "dpo").to_csv(run / "alignment.csv", index=False)
    _minibatch_table(DPO_STEPS, DPO_G).to_csv(run / "alignment_minibatches.csv", index=False)
    return run


@pytest.fixture
def ppo_run(tmp_path) -> Path:
    run = tmp_path / "ppo"
    (run / "model").mkdir(parents=True)
    steps = [0, 4, 8, 12, 16]
    g = {c: [-v for v in vals] for c, vals in DPO_G.items()}
    loss = [0.3, 0.2, 0.25, 0.1, 0.05]
    _alignment_table(steps, g, loss, "ppo", ppo_norms_only_tot=True).to_csv(run / "alignment.csv", index=False)
    _minibatch_table(steps, g, ppo=True).to_csv(run / "alignment_minibatches.csv", index=False)
    history = []
    for s in range(1, 17):
        history.append({"loss": 0.1, "adv/TOP": -0.5 + 0.02 * s, "adv/MID": 0.1 + 0.01 * s,
                        "adv/BOT": 0.01 * np.sin(s), "adv_unwhitened/TOP": -0.3 + 0.02 * s,
                        "adv_unwhitened/MID": 0.2, "adv_unwhitened/BOT": 0.05, "ppo/policy": 0.0, "step": s})
    history.append({"train_runtime": 12.0, "step": 16})  # the trainer's final summary entry has no advantages
    (run / "model" / "log_history.json").write_text(json.dumps(history))
    return run


def _assert_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 10_000
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 400 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_dpo_run_draws_every_figure_but_the_ppo_one(dpo_run):
    paths = draw_figures(dpo_run)
    names = {p.name for p in paths}
    assert names == G_FIGURES | {"grad_norms.png"}
    for p in paths:
        assert p.parent == dpo_run / "figures"
        _assert_png(p)
    assert not (dpo_run / "figures" / "ppo_advantages.png").exists()


def test_ppo_run_adds_the_advantage_figure(ppo_run):
    paths = draw_figures(ppo_run)
    assert {p.name for p in paths} == G_FIGURES | {"grad_norms.png", "ppo_advantages.png"}
    for p in paths:
        _assert_png(p)


def test_missing_minibatch_table_skips_only_grad_norms(dpo_run):
    (dpo_run / "alignment_minibatches.csv").unlink()
    assert {p.name for p in draw_figures(dpo_run)} == G_FIGURES
    assert not (dpo_run / "figures" / "grad_norms.png").exists()


def test_missing_alignment_table_skips_the_G_figures(ppo_run):
    (ppo_run / "alignment.csv").unlink()
    assert {p.name for p in draw_figures(ppo_run)} == {"grad_norms.png", "ppo_advantages.png"}


def test_empty_run_dir_draws_nothing(tmp_path):
    assert draw_figures(tmp_path) == []


def test_exclude_loss_increase_drops_those_steps(dpo_run):
    alignment = pd.read_csv(dpo_run / "alignment.csv")
    assert excluded_steps(alignment) == [200, 400]
    every = curve_data(alignment, "TOP")
    kept = curve_data(alignment, "TOP", exclude_loss_increase=True)
    assert every["step"].tolist() == DPO_STEPS and every["value"].tolist() == DPO_G["TOP"]
    assert kept["step"].tolist() == [0, 100, 300]
    assert kept["value"].tolist() == [DPO_G["TOP"][i] for i in (0, 1, 3)]
    layer = curve_data(alignment, "TOT", layer_group="top", column="G_unfiltered", exclude_loss_increase=True)
    assert layer["step"].tolist() == [0, 100, 300]

    draw_figures(dpo_run)
    plain = mpimg.imread(dpo_run / "figures" / "G_components.png")
    draw_figures(dpo_run, exclude_loss_increase=True)
    filtered = mpimg.imread(dpo_run / "figures" / "G_components.png")
    assert plain.shape != filtered.shape or not np.array_equal(plain, filtered)


@pytest.mark.slow  # a few seconds: the fast tier keeps under 3 minutes
def test_loss_check_csv_lists_the_excluded_steps_and_old_tables_exclude_nothing(dpo_run):
    draw_figures(dpo_run, exclude_loss_increase=True)
    listed = pd.read_csv(dpo_run / "figures" / "loss_check.csv")
    assert listed.loc[listed["excluded"], "step"].tolist() == [200, 400]
    assert (listed["loss_after"] > listed["loss_before"]).tolist() == listed["loss_increased"].tolist()
    draw_figures(dpo_run, exclude_loss_increase=False)
    assert not pd.read_csv(dpo_run / "figures" / "loss_check.csv")["excluded"].any()
    # a table from before the measured check: its flag compared logged losses, and is not used
    old = pd.read_csv(dpo_run / "alignment.csv").drop(columns=["loss_before", "loss_after"])
    old.to_csv(dpo_run / "alignment.csv", index=False)
    assert excluded_steps(load_alignment(dpo_run)) == []


def test_curve_data_reads_string_booleans_and_empty_loss(tmp_path):
    table = pd.DataFrame({"step": [2, 1, 3], "component": "TOT", "layer_group": "all", "G": [0.2, 0.1, np.nan],
                          "loss_increased": ["True", "False", ""]})
    out = curve_data(table, "TOT", exclude_loss_increase=True)
    assert out["step"].tolist() == [1]  # step 2 excluded, step 3's NaN dropped, sorted
    assert curve_data(table, "TOT")["step"].tolist() == [1, 2]


def test_choose_linthresh():
    values = [0.0, 3e-5, -2e-3, 1e-2, 0.5, -0.1, 2e-4, 1e-3, 4e-3, 6e-2]
    assert choose_linthresh(values) == pytest.approx(1e-4)  # 10% quantile of the 9 nonzero |v| is 1.7e-4
    assert choose_linthresh([0.0, 0.0, np.nan]) == 1.0
    assert choose_linthresh([-0.3]) == pytest.approx(0.1)


def test_symlog_ticks_are_thinned_signed_decades():
    major, minor = symlog_ticks([3e-2, -2e-4, 1e-3], linthresh=1e-4)
    assert major == pytest.approx([-1e-3, -1e-4, 0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    assert set(major) <= set(minor) | {0.0}
    major, _ = symlog_ticks([10.0, -5.0, 1e-7], linthresh=1e-8)  # 10 decades a side: at most 4 labelled each
    assert sum(t > 0 for t in major) <= 4 and sum(t < 0 for t in major) <= 4 and 0.0 in major
    assert 10.0 in major and -10.0 in major and 1e-8 not in major  # outermost kept, ±linthresh dropped
    assert symlog_ticks([], linthresh=1.0)[0] == pytest.approx([-1.0, 0.0, 1.0])


def test_mean_norms_and_advantages(ppo_run, dpo_run):
    ppo_align = pd.read_csv(ppo_run / "alignment.csv")
    ppo_mb = pd.read_csv(ppo_run / "alignment_minibatches.csv")
    assert mean_norms(ppo_align, ppo_mb, "POS").empty  # PPO has no POS norms: no second panel
    dpo_mb = pd.read_csv(dpo_run / "alignment_minibatches.csv")
    from_minibatches = mean_norms(None, dpo_mb, "NEG")
    assert from_minibatches["step"].tolist() == DPO_STEPS and (from_minibatches["value"] > 0).all()

    history = json.loads((ppo_run / "model" / "log_history.json").read_text())
    adv = advantage_history(history + [{"step": 3, "adv/TOP": 9.0, "adv/MID": 0, "adv/BOT": 0,
                                        "adv_unwhitened/TOP": 7.0}])
    assert adv["step"].tolist() == list(range(1, 17))
    assert adv.loc[adv["step"] == 3, "TOP"].item() == 9.0  # a re-logged step keeps its last entry
    assert adv.loc[adv["step"] == 3, "TOP unwhitened"].item() == 7.0
    assert adv.loc[adv["step"] == 4, "MID unwhitened"].item() == 0.2
    legacy = advantage_history([{"step": 1, "adv_raw/TOP": 2.0, "adv_raw/MID": 1.0, "adv_raw/BOT": 0.0}])
    assert legacy["TOP unwhitened"].item() == 2.0 and legacy["TOP"].isna().all()  # old logs: un-whitened only
    assert advantage_history([{"loss": 1.0, "step": 1}]).empty


def test_an_objectives_own_component_is_drawn_beside_pos_and_neg(dpo_run, tmp_path):
    """An extra component (CPO's NLL anchor) goes into panel (b), dashed, since POS + NEG + NLL = TOT; the six
    paper components keep their panels."""
    from po_experiments.analysis.plots import component_panels, extra_components

    table = pd.read_csv(dpo_run / "alignment.csv")
    nll = table[table["component"] == "POS"].assign(component="NLL", G=lambda d: d["G"] * 0.1)
    with_nll = pd.concat([table, nll], ignore_index=True)
    assert extra_components(table) == [] and extra_components(with_nll) == ["NLL"]
    assert component_panels(table) == (("(a) overall", ("TOT",)), ("(b) positive / negative", ("POS", "NEG")),
                                       ("(c) loss reweighting", ("TOP", "MID", "BOT")))
    assert component_panels(with_nll)[1] == ("(b) positive / negative / NLL", ("POS", "NEG", "NLL"))
    run = tmp_path / "cpo"
    run.mkdir()
    with_nll.to_csv(run / "alignment.csv", index=False)
    drawn = {p.name: p for p in draw_figures(run)}
    _assert_png(drawn["G_components.png"])
    without = mpimg.imread(next(p for p in draw_figures(dpo_run) if p.name == "G_components.png"))
    assert without.shape == mpimg.imread(drawn["G_components.png"]).shape
    assert not np.array_equal(without, mpimg.imread(drawn["G_components.png"]))  # the NLL curve is on it
