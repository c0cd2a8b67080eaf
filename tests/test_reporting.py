"""Across runs: Table 1 (mean ± std over seeds) and Fig. 4 panels from run dirs, the HTML report in a browser."""
from __future__ import annotations

import json
import shutil
import statistics

import pandas as pd
import pytest
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from po_experiments.reporting import aggregate as agg
from po_experiments.reporting.browser import chromium, open_page
from po_experiments.reporting.html import build_report
from po_experiments.reporting.methods import describe

FINAL = {("DPO", 0): 80.0, ("DPO", 1): 84.0, ("DPO", 2): 88.0, ("cDPO (t1=30, t2=80)", 0): 70.0,
         ("cDPO (t1=30, t2=80)", 1): 75.0, ("DPO w/o NEG (steps 0-30)", 0): 60.0}


def fake_run(root, method, seed, final, *, variant, model="tiny", judge="gold", family="dpo"):
    """A run dir as the pipeline leaves it: summary.json, win_rate.csv, a figure, the verdicts."""
    run = root / "runs" / f"{method}-{model}-{seed}".replace(" ", "_")
    (run / "figures").mkdir(parents=True)
    steps = [20, 40, 60]
    rates = [50.0, (50.0 + final) / 2, final]
    pd.DataFrame({"judge": judge, "step": steps, "win_rate": rates, "win_rate_se": 2.0, "n": 500}).to_csv(
        run / "win_rate.csv", index=False)
    summary = {"algo": family if variant in ("baseline", "ablation") else variant, "model": model, "seed": seed,
               "method": method, "family": family, "variant": variant, "win_rate": final, "win_rate_se": 2.0, "judge": judge,
               "final_step": 60, "wall_time_s": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot(steps, rates)
    fig.savefig(run / "figures" / "win_rate.png")
    verdicts = [{"instruction": "<user> s1 <assistant>", "output_1": "t1", "output_2": "t1 <b>", "preference": 2.0}]
    (run / "eval" / judge).mkdir(parents=True)
    (run / "eval" / judge / "step-60.json").write_text(json.dumps(verdicts))
    return run


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "outputs" / "seeds"
    for (method, seed), final in FINAL.items():
        variant = "baseline" if method == "DPO" else "cdpo" if method.startswith("cDPO") else "ablation"
        fake_run(root, method, seed, final, variant=variant)
    return root


def test_every_case_is_mean_and_std_over_seeds(sweep, tmp_path):
    written = agg.aggregate(sweep, tmp_path / "agg")
    table = pd.read_csv(written["cases.csv"]).set_index("method")
    assert list(table.index) == ["DPO", "cDPO (t1=30, t2=80)", "DPO w/o NEG (steps 0-30)"]  # the paper's order
    assert table.at["DPO", "mean"] == pytest.approx(84.0)
    assert table.at["DPO", "std"] == pytest.approx(statistics.stdev([80, 84, 88]))  # ddof 1, as over seeds
    assert table.at["cDPO (t1=30, t2=80)", "n_seeds"] == 2 and table.at["DPO", "seeds"] == "0 1 2"
    md = written["table1.md"].read_text()
    assert "| DPO | 84.0 ± 4.0 |" in md and "| cDPO (t1=30, t2=80) | 72.5 ± 3.5 |" in md
    assert "| DPO w/o NEG (steps 0-30) | 60.0 (1 seed) |" in md
    for name in ("table1_gold.png", "fig4_tiny_gold.png", "curves.csv"):
        assert written[name].stat().st_size > 1000 or name.endswith(".csv")


# (method label, variant, family) -> {seed: final win rate}: three cDPO cases, cPPO-top and cPPO-mid cases
CASES = {("DPO", "baseline", "dpo"): {0: 70.0, 1: 72.0},
         ("cDPO (t1=10, t2=50)", "cdpo", "dpo"): {0: 74.0, 1: 76.0, 2: 78.0},  # mean 76
         ("cDPO (t1=20, t2=60)", "cdpo", "dpo"): {0: 90.0, 1: 70.0},  # mean 80: the best by mean
         ("cDPO (t1=30, t2=80)", "cdpo", "dpo"): {0: 79.0},  # the best single value, not the best mean
         ("PPO", "baseline", "ppo"): {0: 55.0, 1: 57.0},
         ("cPPO-top (lam=0.3)", "cppo", "ppo"): {0: 58.0, 1: 60.0},  # mean 59
         ("cPPO-mid (lam=0.7)", "cppo_mid", "ppo"): {0: 61.0, 1: 62.0},  # mean 61.5: cPPO's best of top and mid
         ("PPO w/o TOP", "ablation", "ppo"): {0: 99.0}}  # an ablation is no Table 1 row, however high


def case_sweep(root, models=("pythia", "qwen3")):
    for model in models:
        for (method, variant, family), finals in CASES.items():
            for seed, final in finals.items():
                fake_run(root, method, seed, final, variant=variant, family=family, model=model)
    return root


def test_table1_shows_each_rows_best_case_beside_the_paper(tmp_path):
    written = agg.aggregate(case_sweep(tmp_path / "sweep"), tmp_path / "agg")
    table = pd.read_csv(written["table1.csv"])
    pythia = table[table["model"] == "pythia"].set_index("method")
    assert list(pythia.index) == ["DPO", "cDPO", "PPO", "cPPO"]  # the paper's rows, no ablation
    assert pythia.at["cDPO", "case"] == "cDPO (t1=20, t2=60)" and pythia.at["cDPO", "mean"] == pytest.approx(80.0)
    assert pythia.at["cDPO", "n_seeds"] == 2 and pythia.at["cDPO", "n_cases"] == 3
    assert pythia.at["cDPO", "std"] == pytest.approx(statistics.stdev([90, 70]), abs=1e-3)  # csv: 3 decimals
    assert pythia.at["cPPO", "case"] == "cPPO-mid (lam=0.7)" and pythia.at["cPPO", "n_cases"] == 2
    assert (pythia.at["cDPO", "paper_mean"], pythia.at["cDPO", "paper_std"]) == (79.88, 0.13)
    qwen = table[table["model"] == "qwen3"].set_index("method")
    assert (qwen.at["PPO", "paper_mean"], qwen.at["cPPO", "paper_mean"]) == (57.10, 61.77)
    md = written["table1.md"].read_text()
    assert "| Method | pythia ours | pythia paper | qwen3 ours | qwen3 paper |" in md
    assert "| cDPO | 80.0 ± 14.1<br>cDPO (t1=20, t2=60), 2 seed(s), best of 3 | 79.88 ± 0.13 |" in md
    assert "llama3" not in md  # no Llama-3 run supplied, no Llama-3 column
    assert "| PPO w/o TOP | 99.0 (1 seed) | 99.0 (1 seed) |" in md  # every case is still listed below


@pytest.mark.slow  # a few seconds: the fast tier keeps under 3 minutes
def test_table1_llama_column_when_its_runs_are_supplied_and_no_paper_value_for_tiny(tmp_path):
    written = agg.aggregate(case_sweep(tmp_path / "sweep", models=("tiny", "pythia", "llama3")), tmp_path / "agg")
    md = written["table1.md"].read_text()
    assert ("| Method | tiny ours | tiny paper | pythia ours | pythia paper | llama3 ours | llama3 paper |"
            in md)
    dpo = next(line for line in md.splitlines() if line.startswith("| DPO |"))
    assert dpo.split(" | ")[2] == "—" and dpo.endswith("| 67.71 ± 0.27 |")  # tiny: no paper value; Llama's
    table = pd.read_csv(written["table1.csv"])
    assert table[table["model"] == "tiny"]["paper_mean"].isna().all()


def test_curves_and_panels_follow_fig4(sweep):
    rates = agg.checkpoint_rates(agg.find_runs(sweep))
    curves = agg.curves(rates)
    dpo_40 = curves[(curves["method"] == "DPO") & (curves["step"] == 40)].iloc[0]
    assert dpo_40["mean"] == pytest.approx(67.0) and dpo_40["n"] == 3
    panels = dict(agg.panels(curves, "gold", "tiny"))
    assert set(panels) == {"(a) DPO w/o NEG / w/o POS", "(c) cDPO"}
    assert list(panels["(c) cDPO"]) == ["DPO", "cDPO (t1=30, t2=80)"]  # baseline first, then the variant


def test_method_labels_come_from_the_config():
    cfg = OmegaConf.create({"algo": {"name": "cdpo", "family": "dpo", "t1": 30, "t2": 80, "components": ["TOT"]},
                            "ablation": {"name": "none"}})
    assert describe(cfg) == {"method": "cDPO (t1=30, t2=80)", "family": "dpo", "variant": "cdpo",
                             "algo_params": {"t1": 30, "t2": 80}}
    cfg = OmegaConf.create({"algo": {"name": "ppo", "family": "ppo", "lam": None, "components": ["TOT"]},
                            "ablation": {"name": "drop_window", "drop": ["TOP"], "start_step": 0, "stop_step": None}})
    assert describe(cfg)["method"] == "PPO w/o TOP" and describe(cfg)["variant"] == "ablation"


def test_a_beta_sweep_gives_a_table1_row_per_beta(tmp_path):
    """Every algorithm parameter that differs from its schema default is in the label (the method's own t1, t2,
    lam, t3, tau always): a beta sweep is two cases, Table 1's DPO row the best of them (not one row averaging
    both); algo_params holds every parameter."""
    from hydra import compose, initialize_config_dir

    from conftest import REPO

    root = tmp_path / "betas"
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        for beta, finals in ((0.1, (80.0, 82.0)), (0.2, (60.0, 64.0))):
            cfg = compose("config", overrides=[f"algo.beta={beta}"])
            label = describe(cfg)
            assert label["algo_params"] == {"beta": beta}
            for seed, final in enumerate(finals):
                run = fake_run(root, label["method"], seed, final, variant=label["variant"])
                summary = json.loads((run / "summary.json").read_text())
                (run / "summary.json").write_text(json.dumps({**summary, **label}))
        cdpo = describe(compose("config", overrides=["algo=cdpo", "algo.beta=0.2"]))
        ppo = describe(compose("config", overrides=["algo=ppo", "algo.kl_coef=0.1"]))
    assert cdpo["method"] == "cDPO (t1=30, t2=80, beta=0.2)" and ppo["method"] == "PPO (kl_coef=0.1)"
    assert ppo["algo_params"]["cliprange"] == 0.2 and len(ppo["algo_params"]) == 10  # every PPO parameter, weighting too
    methods = agg.method_table(agg.final_rates(agg.checkpoint_rates(agg.find_runs(root)))).set_index("method")
    assert list(methods.index) == ["DPO", "DPO (beta=0.2)"]  # each beta a case of its own, never averaged together
    assert methods.at["DPO", "mean"] == pytest.approx(81.0)
    assert methods.at["DPO (beta=0.2)", "mean"] == pytest.approx(62.0)
    row = agg.table1(methods.reset_index()).set_index("method").loc["DPO"]
    assert row["case"] == "DPO" and row["n_cases"] == 2 and "DPO (beta=0.2): 62.00 (n=2)" in row["cases"]


def test_no_judged_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no run with a win rate"):
        agg.checkpoint_rates([])


def test_html_report_is_self_contained(sweep, tmp_path):
    page = build_report(sweep, tmp_path / "report", title="seeds")
    html = page.read_text()
    assert "84.0 ± 4.0" in html and "t1 &lt;b&gt;" in html  # Table 1 and escaped sample outputs
    images = [s.split('"')[0] for s in html.split('<img src="')[1:]]
    assert len(images) == len(FINAL) + 2  # each run's curve + Table 1 + Fig. 4
    assert all((page.parent / src).exists() and not src.startswith("/") for src in images)


@pytest.mark.slow  # a few seconds: the fast tier keeps under 3 minutes
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs Debian's)")
def test_html_report_loads_every_image_in_chromium(sweep, tmp_path):
    page = build_report(sweep, tmp_path / "report")
    shot = tmp_path / "report.png"
    seen = open_page(page, shot)
    assert seen == {"loaded": len(FINAL) + 2, "total": len(FINAL) + 2}
    assert shot.stat().st_size > 10_000
    moved = tmp_path / "elsewhere"  # relative paths: the folder works wherever it is copied
    shutil.copytree(page.parent, moved)
    (moved / "table1_gold.png").unlink()  # and a missing image is seen as missing
    assert open_page(moved / "index.html") == {"loaded": len(FINAL) + 1, "total": len(FINAL) + 2}


def test_stored_paper_values_are_the_papers_table1():
    """po_experiments/reporting/paper_values.py against the paper's text, where the shared copy is present."""
    import re
    from pathlib import Path

    from po_experiments.reporting.paper_values import TABLE1

    paper = Path(__file__).resolve().parents[2] / "shared" / "papers" / "what-is-po-doing.txt"
    if not paper.exists():
        pytest.skip(f"{paper} not present (no ../shared checkout)")
    text = paper.read_text()
    header = text.index("PO Method\tPythia-2.8B\tQwen3-1.7B\tLlama-3-8B")
    for row, values in TABLE1.items():
        line = re.search(rf"^{row}\t(.*)$", text[header:], re.M).group(1)
        cells = [tuple(float(x) for x in c.split(r" \pm ")) for c in line.split("\t")]
        assert cells == [values["pythia"], values["qwen3"], values["llama3"]], row


def test_a_weighting_on_another_objective_is_in_its_label():
    from test_config import make

    assert describe(make(["algo=grpo"]))["method"] == "GRPO"
    assert describe(make(["algo=cppo"]))["method"].startswith("cPPO-top (lam=")
    label = describe(make(["algo=grpo", "algo.weighting=cppo_mid", "algo.lam=0.5"]))["method"]
    assert label == "GRPO (lam=0.5, weighting=cppo_mid)"
