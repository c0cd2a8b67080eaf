"""The objectives' comparison (experiment=objectives): the table of final win rate and final G per objective, and
the G figure with one panel per objective, from run dirs as the pipeline leaves them."""
from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest
import yaml
from conftest import load_script
from test_experiments import fake_run

from po_experiments.reporting import objectives as obj
from po_experiments.reporting.html import build_report

# algo -> (label, family, checkpoint steps (the last is final_step), extra component, final win rate of seed 0)
OBJECTIVE_RUNS = {"dpo": ("DPO", "dpo", (10, 20, 30), None, 70.0),
                  "cpo": ("CPO", "dpo", (10, 20, 30), "NLL", 64.0),
                  "ppo": ("PPO", "ppo", (5, 10), None, 58.0),
                  "grpo": ("GRPO", "ppo", (5, 10), "KL", 52.0)}
SHOWN = ("TOT", "POS", "NEG")


def g_value(seed: int, component: str, step: int) -> float:
    """Largest at the first checkpoint, smallest at the final one (so the final one is told from the max); the
    extra component negative."""
    factor = -0.5 if component not in SHOWN else SHOWN.index(component) + 1.0
    return (seed + 1) * factor * (100 - step)


def objective_run(root, algo: str, seed: int, *, increased: tuple[int, ...] = (), method: str | None = None,
                  variant: str | None = None, launched: str | None = None):
    """A finished run of `algo` (test_experiments.fake_run's dir, its G table and win rates replaced): G of TOT /
    POS / NEG / TOP / MID / BOT and the objective's extra component at its checkpoints, every layer group."""
    label, family, steps, extra, final = OBJECTIVE_RUNS[algo]
    run = fake_run(root, "tiny", family, seed, method=method or label,
                   variant=variant or ("baseline" if algo == family else algo),
                   overrides=[f"experiment/method={launched or algo}", "experiment/model=tiny", f"seed={seed}"])
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "algo": algo, "final_step": steps[-1], "judge": "gold",
                                                  "win_rate": final + 4 * seed, "win_rate_se": 1.0}))
    components = ("TOT", "POS", "NEG", "TOP", "MID", "BOT", *([extra] if extra else []))
    rows = [{"step": step, "component": c, "layer_group": g, "G": g_value(seed, c, step), "G_unfiltered": 1.0,
             "n_batches": 4, "n_outliers": 0, "grad_norm": 1.0, "loss": 0.5, "loss_before": 0.5,
             "loss_after": 0.6 if step in increased else 0.4, "loss_increased": step in increased,
             "algo_family": family, "dprime": "heldout"}
            for step in steps for c in components for g in ("all", "bottom", "middle", "top")]
    pd.DataFrame(rows).to_csv(run / "alignment.csv", index=False)
    rates = [50.0 + i for i in range(len(steps) - 1)] + [final + 4 * seed]
    pd.DataFrame({"judge": "gold", "step": list(steps), "win_rate": rates, "win_rate_se": 1.0, "n": 32}).to_csv(
        run / "win_rate.csv", index=False)
    return run


@pytest.fixture
def pool(tmp_path):
    """4 objectives x 2 seeds; DPO seed 1's middle checkpoint raised L (App. A); runs the table must leave out: an
    ablation, a case the preset does not sweep, and a run without a G table."""
    root = tmp_path / "paper"
    for algo in OBJECTIVE_RUNS:
        for seed in (0, 1):
            objective_run(root, algo, seed, increased=(20,) if (algo, seed) == ("dpo", 1) else ())
    objective_run(root, "dpo", 5, method="DPO w/o NEG (steps 0-10)", variant="ablation",
                  launched="dpo_wo_neg_early")
    objective_run(root, "dpo", 6, method="cDPO (t1=36, t2=105)", variant="cdpo", launched="cdpo_case3")
    (objective_run(root, "ppo", 7) / "alignment.csv").unlink()
    return root


def test_table_is_mean_and_std_over_seeds_of_the_final_checkpoint(pool, tmp_path):
    written = obj.draw_objectives(pool, tmp_path / "agg")
    table = pd.read_csv(written["objectives.csv"]).set_index("method")
    assert list(table.index) == ["DPO", "CPO", "PPO", "GRPO"]  # pairwise first, registry order; nothing else
    for label, _, steps, extra, final in OBJECTIVE_RUNS.values():
        row = table.loc[label]
        assert row["n_seeds"] == 2 and row["seeds"] == "0 1" and str(row["g_steps"]) == str(steps[-1])
        assert row["win_rate_mean"] == pytest.approx(final + 2)
        assert row["win_rate_std"] == pytest.approx(statistics.stdev([final, final + 4]))
        for c in SHOWN:  # the final checkpoint's G (not the largest, the first), App. A's flag notwithstanding
            values = [g_value(seed, c, steps[-1]) for seed in (0, 1)]
            assert row[f"G_{c}_mean"] == pytest.approx(statistics.mean(values))
            assert row[f"G_{c}_std"] == pytest.approx(statistics.stdev(values))
        for other in ("NLL", "KL"):  # an extra component's column holds values only where the objective has it
            if other == extra:
                assert row[f"G_{other}_mean"] == pytest.approx(-0.5 * 1.5 * (100 - steps[-1]))
                assert row[f"G_{other}_n"] == 2
            else:
                assert pd.isna(row[f"G_{other}_mean"]) and row[f"G_{other}_n"] == 0
    md = written["objectives.md"].read_text()
    assert "| Objective | seeds | win rate vs SFT (%) | final G TOT | final G POS | final G NEG | final G NLL | " \
           "final G KL |" in md
    assert "| DPO | 2 | 72.0 ± 2.8 | 105 ± 49 | 210 ± 99 | 315 ± 148 | — | — |" in md
    assert "| CPO | 2 | 66.0 ± 2.8 | 105 ± 49 | 210 ± 99 | 315 ± 148 | -52.5 ± 24.7 | — |" in md
    assert written["objectives_gold.png"].stat().st_size > 10_000


def test_g_figure_has_one_panel_per_objective_on_the_runs_fraction(pool, tmp_path):
    written = obj.draw_objectives(pool, tmp_path / "agg")
    assert written["objectives_G_tiny.png"].stat().st_size > 20_000
    drawn = pd.read_csv(written["objectives_G_tiny.csv"])
    assert list(dict.fromkeys(drawn["panel"])) == ["DPO (2 runs)", "CPO (2 runs)", "PPO (2 runs)", "GRPO (2 runs)"]
    components = drawn.groupby("panel")["component"].agg(lambda s: tuple(dict.fromkeys(s)))
    assert components["CPO (2 runs)"] == ("TOT", "POS", "NEG", "NLL")
    assert components["GRPO (2 runs)"] == ("TOT", "POS", "NEG", "KL")
    assert components["DPO (2 runs)"] == components["PPO (2 runs)"] == SHOWN
    ppo = drawn[(drawn["panel"] == "PPO (2 runs)") & (drawn["component"] == "TOT")].set_index("fraction")
    assert list(ppo.index) == [0.5, 1.0] and list(ppo["step"]) == [5, 10]  # x: step / final_step
    assert ppo.at[0.5, "mean"] == pytest.approx(1.5 * 95) and ppo.at[0.5, "std"] == pytest.approx(95 / 2 ** 0.5)
    dpo = drawn[(drawn["panel"] == "DPO (2 runs)") & (drawn["component"] == "TOT")].set_index("step")
    assert list(dpo["fraction"]) == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-6)
    assert dpo.at[20, "n"] == 1 and dpo.at[20, "mean"] == pytest.approx(80)  # App. A: seed 1's step 20 left out
    assert dpo.at[30, "n"] == 2

    fig = obj.g_figure(obj.g_panels(obj.objective_tables(obj.analysed_runs(obj.find_runs(pool)))), title="t")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4 and {ax.get_yscale() for ax in visible} == {"symlog"}
    assert len({ax.get_ylim() for ax in visible}) == 1  # one shared y scale


def test_nothing_is_written_without_an_objective_run_with_g(tmp_path):
    root = tmp_path / "paper"
    (objective_run(root, "dpo", 0) / "alignment.csv").unlink()
    objective_run(root, "dpo", 1, method="DPO w/o NEG", variant="ablation", launched="dpo_wo_neg_early")
    assert obj.draw_objectives(root, tmp_path / "agg") == {}
    assert not (tmp_path / "agg").exists()


@pytest.mark.slow  # a few seconds: the fast tier keeps under 3 minutes
def test_aggregate_script_and_report_show_the_objectives_beside_the_other_outputs(pool, tmp_path):
    out = tmp_path / "agg"
    assert load_script("aggregate").main([str(pool), "--out", str(out), "--figures", "objectives"]) == 0
    for name in ("table1.md", "cases.csv", "objectives.md", "objectives.csv", "objectives_gold.png",
                 "objectives_G_tiny.png", "objectives_G_tiny.csv"):
        assert (out / name).exists(), name
    assert load_script("aggregate").main([str(pool), "--out", str(tmp_path / "only"), "--figures", "fig4"]) == 0
    assert not (tmp_path / "only" / "objectives.csv").exists()  # --figures without objectives: not drawn
    page = build_report(pool, tmp_path / "report").read_text()
    assert 'src="objectives_G_tiny.png"' in page and 'src="objectives_gold.png"' in page
    assert "<td>GRPO</td>" in page and "final G KL" in page


def test_the_preset_lists_the_methods_the_table_reads():
    """objectives.is_objective_run keeps the runs of the methods conf/experiment/objectives.yaml sweeps."""
    from conftest import REPO

    preset = yaml.safe_load((REPO / "conf" / "experiment" / "objectives.yaml").read_text())
    methods = {m.strip() for m in preset["hydra"]["sweeper"]["params"]["experiment/method"].split(",")}
    assert obj.preset_methods(obj.PRESET) == methods
    assert all((REPO / "conf" / "experiment" / "method" / f"{m}.yaml").exists() for m in methods)
