"""The paper presets (conf/experiment/): every sweep point composes and validates, in full and fast mode; and every
preset runs in fast mode through run.py (the lightning-hydra-template way) and the aggregation draws its figure or
table from those runs, holding their numbers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments.config import NOT_IDENTITY, _run_name, is_identity_key, validate
from po_experiments.errors import ConfigError
from po_experiments.analysis.plots import ADVANTAGE_LOG_KEYS
from po_experiments.reporting.paper_figures import FIGURES, LEFT_OUT

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODES = {"full": [], "fast": ["mode=fast"]}
PAPER_MODELS = {"pythia", "qwen3", "llama3"}
# The paper states no Llama-3 case: those points stop at validation, naming the unset key (case/llama3/).
LLAMA_UNSET = {"cdpo": "algo.t1", "cppo": "algo.lam", "cppo_mid": "algo.lam", "hppo": "algo.t3"}
PLAIN = {"experiment", "mode", "runtime.threads"}  # command-line keys of the launch, not of the sweep point
OBJECTIVES_PRESET = "objectives"  # every objective on the embedded task: the tiny model at full size, not a paper model
CLAIMS_PRESET = "claims"  # the paper's claims as a table: its own small tiny-model pool (outputs/claims)
CONTROLLER_PRESET = "controller"  # closed-loop cDPO (beyond the paper) on the embedded task: the tiny model, 5 seeds
FULL_MODELS = {OBJECTIVES_PRESET: {"tiny"}, CLAIMS_PRESET: {"tiny"}, CONTROLLER_PRESET: {"tiny"}}  # full mode not on the paper's models
FULL_NAMES = {CLAIMS_PRESET: "claims"}  # the presets whose full-mode runs are not in the paper pool


def _compose(overrides):
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides, return_hydra_config=True)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=True)


def sweep_points(preset: str, mode: str) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes of the preset's hydra.sweeper.params (cartesian product)."""
    cfg = _compose([f"experiment={preset}", *MODES[mode]])
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params)
    return BasicSweeper.split_arguments(overrides, None)[0]


def header(preset: str) -> str:
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def method_algo(method: str) -> str | None:
    """The algo a conf/experiment/method/<method>.yaml selects (`override /algo: <name>`)."""
    defaults = yaml.safe_load((CONF / "experiment" / "method" / f"{method}.yaml").read_text()).get("defaults", [])
    return next((v for d in defaults if isinstance(d, dict) for k, v in d.items() if k == "override /algo"), None)


def missing_algo(point) -> str | None:
    """The conf/algo/<name>.yaml a sweep point's method needs and this checkout lacks (an objective another branch
    adds), None when it composes."""
    method = next((p.split("=", 1)[1] for p in point if p.startswith("experiment/method=")), None)
    algo = method_algo(method) if method else None
    return f"conf/algo/{algo}.yaml" if algo and not (CONF / "algo" / f"{algo}.yaml").exists() else None


def first_seed(points: list[list[str]]) -> list[list[str]]:
    """The points of the sweep's first seed: the others differ in `seed=` alone (an int the schema checks)."""
    seed = next(p for p in points[0] if p.startswith("seed="))
    return [p for p in points if seed in p]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates_its_first_point(preset, mode):
    """The fast tier's check of every preset: its first sweep point composes and validates (or, for a Llama-3 case
    the paper does not state, stops naming the unset key); the slow tier composes every point."""
    point = next(p for p in first_seed(sweep_points(preset, mode)) if not missing_algo(p))
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = _compose([f"experiment={preset}", *MODES[mode], *point, "paths.cache_dir=/nowhere"])
    cfg.paths.output_dir = "/nowhere"
    try:
        validate(cfg)
    except ConfigError as err:
        algo = _method(point).rsplit("_case", 1)[0]
        assert mode == "full" and "experiment/model=llama3" in point and LLAMA_UNSET[algo] in str(err), (point, err)
        return
    assert cfg.model.name == ("tiny" if mode == "fast" else cfg.model.name) and cfg.algo.name == method_algo(_method(point))


@pytest.fixture(scope="module")
def composed():
    """Every sweep point (first seed) of every preset in both modes: (preset, mode, point) -> (config or
    ConfigError, run dir)."""
    out = {}
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for preset in PRESETS:
            for mode in MODES:
                for point in first_seed(sweep_points(preset, mode)):
                    if missing_algo(point):  # test_objectives_preset_composes_every_method says which
                        continue
                    cfg = _compose([f"experiment={preset}", *MODES[mode], *point, "paths.cache_dir=/nowhere"])
                    # paths.output_dir is ${hydra:runtime.output_dir}, resolvable only inside a job
                    cfg.paths.output_dir = "/nowhere"
                    run_dir = (cfg.name, _run_name(cfg.hydra.overrides.task))
                    try:
                        validate(cfg)
                        result = cfg
                    except ConfigError as err:
                        result = err
                    out[preset, mode, tuple(point)] = (result, run_dir)
    return out


def _method(point) -> str:
    return next(p.split("=", 1)[1] for p in point if p.startswith("experiment/method="))


@pytest.mark.slow  # composes every sweep point of every preset (~2 min): the fast tier composes one per preset
@pytest.mark.parametrize("preset", PRESETS)
def test_every_sweep_point_composes_and_validates(preset, composed):
    """Full mode: the paper's model(s); fast mode: the same methods and settings on the tiny model, seed 0."""
    points = {mode: sweep_points(preset, mode) for mode in MODES}
    sweeps = {mode: [(point, *composed[preset, mode, tuple(point)]) for point in first_seed(points[mode])
                     if not missing_algo(point)] for mode in MODES}
    for point, result, _ in sweeps["full"]:
        if isinstance(result, ConfigError):  # only the Llama-3 cases the paper does not state
            algo = _method(point).rsplit("_case", 1)[0]
            assert "experiment/model=llama3" in point and algo in LLAMA_UNSET, (point, result)
            assert LLAMA_UNSET[algo] in str(result)
        else:
            assert result.model.name in FULL_MODELS.get(preset, PAPER_MODELS), point
            assert result.name == FULL_NAMES.get(preset, "paper"), point
    for point, result, _ in sweeps["fast"]:
        assert not isinstance(result, ConfigError), (point, result)
        assert (result.model.name, result.name, result.seed, result.logger.name) == ("tiny", "paper_fast", 0, "none")
        assert result.data.name == "synthetic" and result.model.dpo.max_steps == 108  # the tiny cases' run length
        if result.algo.get("t2") is not None:
            assert 0 <= result.algo.t1 < result.algo.t2 <= result.model.dpo.max_steps
        if result.ablation.name != "none" and result.algo.family == "dpo":
            assert max(result.ablation.start_step, result.ablation.stop_step or 0) < result.model.dpo.max_steps

    def settings(point):  # the sweep point without its model and seed
        return tuple(p for p in point if not p.startswith(("experiment/model=", "seed=")))

    full, fast = points["full"], points["fast"]
    assert sorted(set(map(settings, full))) == sorted(map(settings, fast))  # fast trims models and seeds only
    assert {p for point in fast for p in point if p.startswith("seed=")} == {"seed=0"}
    # the header's commands and sweep sizes are the preset's own
    text = header(preset)
    for command in (f"python run.py -m experiment={preset}", f"experiment={preset} mode=fast", "scripts/aggregate.py"):
        assert command in text
    sizes = re.search(r"= (\d+) runs \(fast: (\d+) runs?,", text)
    assert sizes and (int(sizes[1]), int(sizes[2])) == (len(full), len(fast))
    assert preset in ("table1", OBJECTIVES_PRESET, CLAIMS_PRESET, CONTROLLER_PRESET) or preset in FIGURES  # the aggregation draws it
@pytest.mark.slow  # composes every sweep point of every preset (~2 min): the fast tier composes one per preset
def test_sweep_points_that_share_a_run_dir_are_the_same_run(composed):
    """Presets share the pool outputs/<name>/: a run dir is named by its sweep point, not by the preset, so any two
    points that land in one run dir must compose to the same run config (Fig. 1's DPO seed 0 is Fig. 5's), up to
    the settings that are no part of a run's identity (Fig. 7 analyses Fig. 1's runs against another D'; Fig. 4
    trains them without G)."""
    assert not is_identity_key("experiment") and is_identity_key("experiment/method")
    assert is_identity_key("mode")  # fast runs are named apart

    by_dir: dict[tuple, tuple] = {}
    shared = 0
    for key, (result, run_dir) in composed.items():
        if isinstance(result, ConfigError):
            continue
        config = OmegaConf.to_container(result, resolve=False)
        for k in ("hydra", *NOT_IDENTITY):
            config.pop(k, None)
        if run_dir in by_dir:
            other_key, other = by_dir[run_dir]
            assert config == other, f"{key} and {other_key} share {run_dir} but differ"
            shared += other_key[0] != key[0]
        else:
            by_dir[run_dir] = (key, config)
    assert shared > 0  # e.g. fig1 and fig5 do share runs


G_KINDS_WITHOUT_G = {"win_rate", "advantages"}  # figures drawn from win rates / logged advantages: no G needed
@pytest.mark.slow  # composes every sweep point of every preset (~2 min): the fast tier composes one per preset
def test_g_runs_only_for_the_presets_whose_figure_draws_it(composed):
    """G (analysis.enabled) is on for every run of a G figure's preset (FIGURES: Fig. 1, 2, 5-10) and of the
    objectives' comparison, and off for the win-rate presets (Fig. 4, 11-19, Table 1) and Fig. 3, in full and fast
    mode."""
    for (preset, mode, point), (result, _) in composed.items():
        if isinstance(result, ConfigError):
            continue
        uses_g = preset in (OBJECTIVES_PRESET, CLAIMS_PRESET) or \
            preset in FIGURES and FIGURES[preset].kind not in G_KINDS_WITHOUT_G
        assert result.analysis.enabled == uses_g, (preset, mode, point)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):  # unless asked on the command line
        assert _compose(["experiment=fig4", "analysis.enabled=true"]).analysis.enabled
@pytest.mark.slow  # composes every sweep point of every preset (~2 min): the fast tier composes one per preset
def test_fig7_analyses_fig1s_runs(composed):
    """Fig. 7's points are Fig. 1's run dirs (no retraining), asked for with the in-distribution D'."""
    fig1 = {run_dir for (preset, _, _), (_, run_dir) in composed.items() if preset == "fig1"}
    fig7 = {run_dir for (preset, _, _), (_, run_dir) in composed.items() if preset == "fig7"}
    assert fig7 == fig1 and len(fig7) == 2  # full and fast
    assert {r.analysis.dprime for (p, _, _), (r, _) in composed.items() if p == "fig7"} == {"train"}


OBJECTIVE_METHODS = [m.strip() for m in yaml.safe_load((CONF / "experiment" / f"{OBJECTIVES_PRESET}.yaml").read_text())
                     ["hydra"]["sweeper"]["params"]["experiment/method"].split(",")]


POOL_OBJECTIVES = ["dpo", "ppo", "simpo_controlled", "rpo", "grpo"]


def pool_method(point) -> str:
    return next(o.split("=", 1)[1] for o in point if o.startswith("experiment/method="))


@pytest.mark.slow  # composes every sweep point of every preset (~2 min): the fast tier composes one per preset
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", OBJECTIVE_METHODS)
def test_objectives_preset_composes_every_method(method, mode, composed):
    """Every method of experiment=objectives composes and validates on the tiny model with G on: 3 seeds in full
    mode (the tiny model at its full size), seed 0 in fast mode. A method whose conf/algo/<name>.yaml this checkout
    lacks (an objective its own branch adds) is skipped, naming the file."""
    from po_experiments.reporting.methods import describe

    points = [p for p in sweep_points(OBJECTIVES_PRESET, mode) if f"experiment/method={method}" in p]
    assert {p for point in points for p in point if p.startswith("seed=")} == \
        ({"seed=0", "seed=1", "seed=2"} if mode == "full" else {"seed=0"})
    if missing := missing_algo(points[0]):
        pytest.skip(f"{missing} is not in this checkout (its objective's branch adds it)")
    result, _ = composed[OBJECTIVES_PRESET, mode, tuple(first_seed(points)[0])]
    assert not isinstance(result, ConfigError), result
    assert result.algo.name == method_algo(method) and result.algo.family in ("dpo", "ppo")
    assert (result.model.name, result.data.name, result.analysis.enabled) == ("tiny", "synthetic", True)
    assert result.model.dpo.max_steps == (108 if mode == "fast" else -1)  # full: the tiny config's 2 epochs
    if method == "simpo_controlled":
        assert (result.algo.t1, result.algo.t2) == (30, 80) and "t1=30, t2=80" in describe(result)["method"]


def test_the_controlled_method_puts_cdpos_schedule_on_its_objective():
    """simpo_controlled: the tiny model's cDPO case 1, (t1, t2) = (30, 80), on SimPO, inside the run in full and fast
    mode. Composed with algo=dpo in place of SimPO (the command line's algo wins over the method's), so it is
    checked before conf/algo/simpo.yaml exists: the schedule is every pairwise schema's, not SimPO's own."""
    from po_experiments import plan, run_length
    from po_experiments.reporting.methods import describe

    assert method_algo("simpo_controlled") == "simpo"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for mode, extra in MODES.items():
            cfg = _compose([f"experiment={OBJECTIVES_PRESET}", *extra, "experiment/method=simpo_controlled", "algo=dpo",
                            "paths.cache_dir=/nowhere"])
            cfg.paths.output_dir = "/nowhere"
            validate(cfg)
            assert (cfg.algo.t1, cfg.algo.t2) == (cfg.model.cdpo.t1, cfg.model.cdpo.t2) == (30, 80)
            record = run_length.check(cfg, plan.rows(cfg, "preferences"), where=f"simpo_controlled {mode}")
            settings = {s["key"]: s["inside"] for s in record["settings"]}
            assert settings["algo.t1"] and settings["algo.t2"], record
            assert describe(cfg)["method"] == "DPO (t1=30, t2=80)"  # SimPO: "SimPO (t1=30, t2=80)"


# ------------------------------------------------------------------------------------------ fast mode, end to end

DRIVER = r"""
import json, runpy, sys
repo, status_file, presets = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, repo)
from hydra.core.global_hydra import GlobalHydra
status = {}
for spec in presets:  # python run.py -m experiment=<preset> mode=fast, each in this one process (imports once)
    preset, *extra = spec.split()  # "<preset> [overrides]": the objectives preset narrowed to what composes here
    sys.argv = [f"{repo}/run.py", "-m", f"experiment={preset}", "mode=fast", "runtime.threads=1", *extra]
    try:
        runpy.run_path(f"{repo}/run.py", run_name="__main__")
        status[preset] = "ok"
    except BaseException as err:  # a failed job ends the multirun with SystemExit
        status[preset] = f"{type(err).__name__}: {err}"
    finally:
        GlobalHydra.instance().clear()
    json.dump(status, open(status_file, "w"))
"""


@pytest.fixture(scope="module")
def fast_pool(tmp_path_factory):
    """`python run.py -m experiment=<preset> mode=fast` for every preset, in a scratch working directory (the runs
    land in its outputs/paper_fast/), sharing one cache: the tiny SFT model and pairs are built once."""
    work = tmp_path_factory.mktemp("presets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PO_CACHE_DIR": str(work / "cache")}
    # The objectives preset here runs a few methods that cover its kinds (DPO and PPO, shared with the paper presets;
    # the generic controlled schedule; an NLL anchor; GRPO's groups and KL term): the whole 19-method sweep is a
    # measurement (the note), and every objective has its own end-to-end run.py test
    # (test_pairwise_objectives.py, test_pg_objectives.py).
    methods = [m for m in POOL_OBJECTIVES if not missing_algo([f"experiment/method={m}"])]
    specs = [f"{p} experiment/method={','.join(methods)}" if p == OBJECTIVES_PRESET else p for p in PRESETS]
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(REPO), str(work / "status.json"), *specs], cwd=work,
                          env=env, capture_output=True, text=True, timeout=2400)
    status = json.loads((work / "status.json").read_text()) if (work / "status.json").exists() else {}
    assert proc.returncode == 0 and status == {p: "ok" for p in PRESETS}, (status, proc.stderr[-6000:])
    return work / "outputs" / "paper_fast", status


@pytest.fixture(scope="module")
def aggregated(fast_pool):
    from conftest import load_script

    root, _ = fast_pool
    assert load_script("aggregate").main([str(root)]) == 0
    return root / "aggregate"


def pool_runs(root: Path) -> dict[frozenset, Path]:
    """Run dir of every sweep point in the pool, keyed by the point's overrides (the launch's plain keys left out)."""
    runs = {}
    for summary in root.glob("multirun/*/summary.json"):
        overrides = yaml.safe_load((summary.parent / ".hydra" / "overrides.yaml").read_text())
        runs[frozenset(o for o in overrides if o.split("=", 1)[0] not in PLAIN)] = summary.parent
    return runs


def _rates(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "win_rate.csv").set_index("step")["win_rate"]


def check_g_figure(table: pd.DataFrame, runs: list[Path], dprime: str) -> None:
    """Every number of a G figure is one of its run's (one seed: the mean over runs is the run's value)."""
    assert len(runs) == 1, runs
    run = runs[0]
    from po_experiments.analysis.tables import paper_target  # the paper's figures: G against D' only

    alignment = pd.concat([paper_target(pd.read_csv(p))
                           for p in [run / "alignment.csv", *run.glob("analysis_*/alignment.csv")]])
    alignment = alignment[alignment["dprime"] == dprime]
    batches = paper_target(pd.read_csv(run / "alignment_minibatches.csv"))
    history = json.loads((run / "model" / "log_history.json").read_text())
    for row in table.itertuples():
        if row.series == LEFT_OUT:  # App. A: a checkpoint whose next update raised L on the G sample
            flagged = alignment.loc[(alignment["step"] == row.step), "loss_increased"]
            assert flagged.astype(str).str.lower().eq("true").all() and row.n == 1, row
            continue
        if row.series == "minibatch":
            values = batches.loc[(batches["component"] == "TOT") & (batches["step"] == row.step), "grad_norm"]
        elif row.panel.startswith("mean raw (signed) advantage"):
            key = ADVANTAGE_LOG_KEYS[row.series]
            values = pd.Series([h[key] for h in history if h.get("step") == row.step and key in h])
        else:
            component, group = (row.series, "all") if row.series.isupper() else ("TOT", row.series)
            rows = alignment[(alignment["component"] == component) & (alignment["layer_group"] == group)
                             & (alignment["step"] == row.step)]
            values = rows[["G", "G_unfiltered", "grad_norm"]].stack()
        assert any(abs(v - row.mean) <= 1e-4 * max(1.0, abs(v)) for v in values), (row, list(values))


def check_objectives(aggregated: Path, runs: list[Path], summaries: list[dict]) -> None:
    """objectives.csv: per run (one seed) its final win rate and its last checkpoint's G of TOT / POS / NEG and
    extras; objectives_G_tiny.csv: a panel per run whose final point is that G, at fraction 1."""
    table = pd.read_csv(aggregated / "objectives.csv").set_index("method")
    drawn = pd.read_csv(aggregated / "objectives_G_tiny.csv")
    assert len(table) == len(runs) and set(drawn["panel"]) == {f"{s['method']} (1 run)" for s in summaries}
    for run, s in zip(runs, summaries):
        row = table.loc[s["method"]]
        assert row["n_seeds"] == 1 and row["win_rate_mean"] == pytest.approx(s["win_rate"], abs=1e-6)
        from po_experiments.analysis.tables import paper_target

        alignment = paper_target(pd.read_csv(run / "alignment.csv"))
        final = alignment[(alignment["layer_group"] == "all") & (alignment["step"] == alignment["step"].max())]
        extras = set(final["component"]) - {"TOT", "POS", "NEG", "TOP", "MID", "BOT"}
        for component in ("TOT", "POS", "NEG", *extras):
            value = final.loc[final["component"] == component, "G"].item()
            assert row[f"G_{component}_mean"] == pytest.approx(value, rel=1e-6, abs=1e-12), (s["method"], component)
            last = drawn[(drawn["panel"] == f"{s['method']} (1 run)") & (drawn["component"] == component)]
            assert last["fraction"].max() == pytest.approx(alignment["step"].max() / s["final_step"])
    assert (aggregated / "objectives_G_tiny.png").stat().st_size > 20_000


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_in_fast_mode_and_the_aggregation_draws_it(preset, fast_pool, aggregated):
    root, status = fast_pool
    assert status[preset] == "ok", status[preset]
    pool = pool_runs(root)
    points = [frozenset(p) for p in sweep_points(preset, "fast") if not missing_algo(p)
              and (preset != OBJECTIVES_PRESET or pool_method(p) in POOL_OBJECTIVES)]
    missing = [sorted(p) for p in points if p not in pool]
    assert not missing, f"no finished run for {missing}"
    runs = [pool[p] for p in points]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert all(s["model"] == "tiny" and s["final_step"] > 0 and s["judge"] == "gold" for s in summaries)

    if preset == OBJECTIVES_PRESET:  # one row and one G panel per objective, holding its run's numbers
        check_objectives(aggregated, runs, summaries)
        return
    if preset == CLAIMS_PRESET:  # every claim measured: the pool holds each run the claims read (seed 0)
        claims = pd.read_csv(aggregated / "claims.csv")
        from po_experiments.reporting.claims import CLAIMS, NOT_MEASURABLE
        tiny = claims[claims["model"] == "tiny"]
        assert list(tiny["claim"]) == [c.id for c in CLAIMS]
        assert not (tiny["verdict"] == NOT_MEASURABLE).any(), tiny[["claim", "measured"]]
        assert "### The paper's claims (tiny)" in (aggregated / "claims.md").read_text()
        return
    if preset == CONTROLLER_PRESET:  # DPO, the cDPO cases and the controller run, each holding its run's numbers
        table = pd.read_csv(aggregated / "controller.csv").set_index("method")
        for s in summaries:
            assert table.at[s["method"], "mean"] == pytest.approx(s["win_rate"], abs=1e-3)
        controlled = [s for s in summaries if s.get("controller") == "g_balance"]
        assert len(controlled) == 1 and controlled[0]["method"] == "cDPO (g_balance)"
        assert table.at["cDPO (g_balance)", "controller_overhead"] == pytest.approx(
            controlled[0]["controller_overhead"], abs=1e-3)
        assert (aggregated / "controller_lambda_tiny.png").stat().st_size > 10_000
        return
    if preset == "table1":  # each row: the best of its cases (every case of the sweep is in cases.csv)
        cases = pd.read_csv(aggregated / "cases.csv").set_index("method")
        rate = {s["method"]: s["win_rate"] for s in summaries}
        for method, value in rate.items():
            assert cases.at[method, "mean"] == pytest.approx(value, abs=1e-3)
        table = pd.read_csv(aggregated / "table1.csv").set_index("method")
        rows = list(table.index)  # the paper's rows first; objectives other presets trained follow (their own rows)
        assert rows[:5] == ["DPO", "cDPO", "PPO", "cPPO", "hPPO"]
        from po_experiments.objectives import OBJECTIVES
        assert set(rows[5:]) <= {spec.table1_row for spec in OBJECTIVES.values()} - set(rows[:5]), rows
        for row, variants in (("cDPO", ("cdpo",)), ("cPPO", ("cppo", "cppo_mid")), ("hPPO", ("hppo",))):
            candidates = {s["method"]: s["win_rate"] for s in summaries if s["variant"] in variants}
            # the pool may hold more cases of a row (Fig. 17's tau = 0.5 and t3 = 400 hPPO runs): the best of all
            assert table.at[row, "n_cases"] >= len(candidates) == 3 * len(variants)
            assert table.at[row, "mean"] >= max(candidates.values()) - 1e-3
            assert cases.at[table.at[row, "case"], "mean"] == pytest.approx(table.at[row, "mean"], abs=1e-3)
        assert "paper" in (aggregated / "table1.md").read_text()
        assert (aggregated / "table1_gold.png").stat().st_size > 10_000
        return
    fig = FIGURES[preset]
    if fig.kind == "win_rate":
        png = aggregated / f"{preset}_tiny_gold.png"
        table = pd.read_csv(png.with_suffix(".csv"))
        assert set(table["method"]) == {s["method"] for s in summaries}  # every curve of the sweep, nothing else
        for run, s in zip(runs, summaries):
            drawn = table[table["method"] == s["method"]].set_index("step")["mean"]
            pd.testing.assert_series_equal(drawn, _rates(run), check_names=False, atol=1e-3)
    else:
        png = aggregated / f"{preset}_tiny.png"
        table = pd.read_csv(png.with_suffix(".csv"))
        families = {s["family"] for s in summaries}
        assert set(table["family"].str.lower()) == families and len(table) > 0
        if fig.kind == "no_sft":  # Fig. 8: (a) from the run with SFT, (b) and (c) from the run started from the base
            by_sft = {s["sft"]: (r, s) for r, s in zip(runs, summaries)}
            assert set(by_sft) == {True, False} and by_sft[False][1]["reference"] == "base"
            assert "/base/" in by_sft[False][1]["sft_dir"] and "/sft/" in by_sft[True][1]["sft_dir"]
            for letter, sft in (("(a)", True), ("(b)", False), ("(c)", False)):
                panel = table[table["panel"].str.startswith(letter)]
                assert panel["mean"].notna().sum() >= 2, f"panel {letter} holds no data"
                check_g_figure(panel, [by_sft[sft][0]], "heldout")
            families = set()
        for family in families:
            chosen = [r for r, s in zip(runs, summaries) if s["family"] == family]
            check_g_figure(table[table["family"].str.lower() == family], chosen,
                           "train" if fig.kind == "in_distribution" else "heldout")
    assert png.stat().st_size > 10_000


# ------------------------------------------------------------------------------------------ the figures, offline

def fake_run(root: Path, model: str, family: str, seed: int, *, dprime: str = "heldout", variant: str = "baseline",
             method: str | None = None, sft: bool = True, exclude: bool | None = None,
             increased: tuple[int, ...] = (), overrides: list[str] | None = None) -> Path:
    """A finished run dir as the pipeline leaves it, with G = (seed + 1) x a fixed pattern (x 100 without SFT);
    `increased`: steps whose loss check says the next update raised L; `exclude`: analysis.exclude_loss_increase;
    `overrides`: the dir is named as Hydra named it before analysis settings stopped naming runs, and records them
    (.hydra/overrides.yaml)."""
    variant = variant if sft else "no_sft"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", ",".join(sorted(overrides))) if overrides else \
        f"{model}-{family}-{variant}-{seed}-{dprime}"
    run = root / "multirun" / name
    (run / "model").mkdir(parents=True)
    (run / ".hydra").mkdir()
    analysis = {"dprime": dprime, **({} if exclude is None else {"exclude_loss_increase": exclude})}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"analysis": analysis}))
    if overrides:
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    summary = {"algo": family, "model": model, "seed": seed, "method": method or family.upper(), "family": family,
               "variant": variant, "win_rate": 60.0 + seed, "final_step": 20, "sft": sft,
               "reference": "sft" if sft else "base"}
    (run / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame({"judge": "gold", "step": [10, 20], "win_rate": [55.0 + seed, 60.0 + seed], "win_rate_se": 1.0,
                  "n": 32}).to_csv(run / "win_rate.csv", index=False)
    scale = 1 if sft else 100
    rows = [{"step": step, "component": c, "layer_group": g, "G": scale * (seed + 1) * (i + 1) * step,
             "G_unfiltered": -(seed + 1) * step, "n_batches": 4, "n_outliers": 1, "grad_norm": scale * (seed + 1.0),
             "loss": 0.5, "loss_before": 0.5, "loss_after": 0.6 if step in increased else 0.4,
             "loss_increased": step in increased, "algo_family": family, "dprime": dprime}
            for step in (10, 20) for i, c in enumerate(("TOT", "POS", "NEG", "TOP", "MID", "BOT"))
            for g in ("all", "bottom", "middle", "top")]
    pd.DataFrame(rows).to_csv(run / "alignment.csv", index=False)
    (run / "alignment_settings.json").write_text(json.dumps({"dprime": dprime, "n_pairs": 24}))
    pd.DataFrame([{"step": s, "batch": b, "component": "TOT", "grad_norm": 1.0 + b, "G": 0.1, "outlier": b == 3}
                  for s in (10, 20) for b in range(4)]).to_csv(run / "alignment_minibatches.csv", index=False)
    history = [{"step": s, "adv/TOP": -s * (seed + 1), "adv/MID": 0.5, "adv/BOT": 0.0, "adv_unwhitened/TOP": -s,
                "adv_unwhitened/MID": 0.25, "adv_unwhitened/BOT": 0.1} for s in (10, 20)]
    (run / "model" / "log_history.json").write_text(json.dumps(history if family == "ppo" else []))
    return run


def add_analysis(run: Path, settings: dict, factor: float) -> Path:
    """A G table of other analysis settings in the run's `analysis_<key>/` (analysis.variants): G = factor x the
    fixed pattern."""
    from po_experiments.analysis.variants import analysis_key

    folder = run / f"analysis_{analysis_key(settings)}"
    folder.mkdir()
    table = pd.read_csv(run / "alignment.csv")
    table["G"] = table["G"] / table["G"].abs().max() * 6 * 20 * factor  # the seed-0 pattern times factor
    table.assign(dprime=settings["dprime"]).to_csv(folder / "alignment.csv", index=False)
    (folder / "alignment_settings.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.slow  # a few seconds: the fast tier keeps under 3 minutes
def test_g_figures_are_the_mean_over_seeds_per_model(tmp_path):
    from po_experiments.reporting.paper_figures import draw_paper_figures

    root = tmp_path / "paper"
    for model in ("pythia", "qwen3"):
        for family in ("dpo", "ppo"):
            for seed in (0, 1):
                if (model, family, seed) == ("pythia", "dpo", 1):
                    fake_run(root, model, family, seed, overrides=["seed=1"])
                else:
                    fake_run(root, model, family, seed)
    seed0 = root / "multirun" / "pythia-dpo-baseline-0-heldout"
    # Fig. 7 on Fig. 1's seed-0 run: the train-D' table with the run's own settings (G x 1), not the one with
    # another sample size (G x 100)
    add_analysis(seed0, {"dprime": "train", "n_pairs": 24}, 1.0)
    add_analysis(seed0, {"dprime": "train", "n_pairs": 99}, 100.0)
    # a Fig. 7 run dir of seed 1 named before analysis settings stopped naming runs: its twin trained the same
    # model (counted once in win rates), its own table has the train D' (G = 2 x the pattern)
    fake_run(root, "pythia", "dpo", 1, dprime="train", overrides=["analysis.dprime=train", "seed=1"])
    fake_run(root, "pythia", "dpo", 0, variant="cdpo", method="cDPO (t1=5, t2=15)")
    written = draw_paper_figures(root, tmp_path / "out")
    # each figure for its own paper model only: Fig. 1 is Pythia's, Fig. 10 is Qwen3's
    assert {"fig1_pythia.png", "fig10_qwen3.png", "fig3_pythia.png", "fig7_pythia.png", "fig12_pythia_gold.png",
            "fig4_pythia_gold.png"} <= set(written)
    assert not {"fig1_qwen3.png", "fig10_pythia.png", "fig7_qwen3.png", "fig13_qwen3_gold.png"} & set(written)

    fig1 = pd.read_csv(written["fig1_pythia.csv"])
    tot = fig1[(fig1["series"] == "TOT")].set_index("step")
    assert tot.at[20, "mean"] == pytest.approx(1.5 * 20) and tot.at[20, "std"] == pytest.approx(20 / 2 ** 0.5)
    assert (tot["n"] == 2).all() and set(fig1["family"]) == {"DPO"}  # the dprime=train tables are not counted
    fig7 = pd.read_csv(written["fig7_pythia.csv"])
    tot7 = fig7[(fig7["series"] == "TOT") & (fig7["step"] == 20)]
    assert tot7["mean"].item() == pytest.approx((20 + 40) / 2) and tot7["n"].item() == 2
    fig6 = pd.read_csv(written["fig6_pythia.csv"])
    unfiltered = fig6[fig6["panel"] == "without outlier filtering"]
    assert set(unfiltered["family"]) == {"DPO", "PPO"} and (unfiltered["mean"] < 0).all()
    fig3 = pd.read_csv(written["fig3_pythia.csv"])
    assert fig3.loc[(fig3["series"] == "TOP") & (fig3["step"] == 20), "mean"].item() == pytest.approx(-30)
    assert fig3.loc[(fig3["series"] == "TOP unwhitened") & (fig3["step"] == 20), "mean"].item() == pytest.approx(-20)
    assert list(dict.fromkeys(fig3["series"]))[:6] == list(ADVANTAGE_LOG_KEYS)  # whitened first, both drawn
    fig5 = pd.read_csv(written["fig5_pythia.csv"])
    batches = fig5[fig5["series"] == "minibatch"]
    assert len(batches) == 2 * 2 * 2 * 4 and batches["outlier"].sum() == 2 * 2 * 2  # both families, seeds, steps
    fig12 = pd.read_csv(written["fig12_pythia_gold.csv"]).set_index(["method", "step"])
    assert fig12.at[("DPO", 20), "mean"] == 60.5 and fig12.at[("cDPO (t1=5, t2=15)", 20), "mean"] == 60.0
    assert fig12.at[("DPO", 20), "n"] == 2  # the dprime=train twin trains the same model: counted once


@pytest.mark.slow  # composes every sweep point of every preset (~2 min): the fast tier composes one per preset
@pytest.mark.parametrize("preset", PRESETS)
def test_every_sweep_points_step_settings_lie_inside_its_run(preset, composed):
    """The plan's run length (the data's known size) holds every t1, t2, t3, ablation window and save interval of
    every sweep point, in full and fast mode (fast: the tiny cases scaled to the tiny run)."""
    from po_experiments import plan, run_length

    for mode in MODES:
        for point in first_seed(sweep_points(preset, mode)):
            if missing_algo(point):
                continue
            cfg, _ = composed[preset, mode, tuple(point)]
            if isinstance(cfg, ConfigError):  # the Llama-3 cases the paper does not state (checked above)
                continue
            record = run_length.check(cfg, plan.rows(cfg, "preferences"), where=f"{preset} {mode}")
            assert record["steps"] and all(s["inside"] for s in record["settings"]), (point, record)
            if mode == "full" and cfg.model.name == "pythia":
                assert record["steps"] == (7642 if cfg.algo.family == "dpo" else 1433)


def test_app_a_filter_leaves_out_checkpoints_whose_update_raised_the_loss(tmp_path):
    """A checkpoint whose loss check says after > before is left out of the G curves (and listed in the CSV) when
    analysis.exclude_loss_increase is on (the default), and kept when it is off; gradient norms keep it."""
    from po_experiments.reporting.paper_figures import LEFT_OUT, draw_paper_figures

    for exclude, folder in ((None, "on"), (False, "off")):
        root = tmp_path / folder
        fake_run(root, "pythia", "dpo", 0, exclude=exclude, increased=(10,))
        fake_run(root, "pythia", "dpo", 1, exclude=exclude)
        fig1 = pd.read_csv(draw_paper_figures(root, tmp_path / f"out_{folder}", only=["fig1"])["fig1_pythia.csv"])
        tot = fig1[fig1["series"] == "TOT"].set_index("step")
        left_out = fig1[fig1["series"] == LEFT_OUT]
        if exclude is None:
            assert tot.at[10, "n"] == 1 and tot.at[10, "mean"] == pytest.approx(2 * 10)  # seed 1's value alone
            assert tot.at[20, "n"] == 2 and set(left_out["step"]) == {10} and (left_out["n"] == 1).all()
        else:
            assert tot.at[10, "n"] == 2 and tot.at[10, "mean"] == pytest.approx(1.5 * 10) and left_out.empty


def test_fig8_draws_b_and_c_from_the_runs_without_sft_which_no_other_figure_uses(tmp_path):
    from po_experiments.reporting.paper_figures import draw_paper_figures

    root = tmp_path / "paper"
    fake_run(root, "pythia", "dpo", 0)
    fake_run(root, "pythia", "dpo", 0, sft=False)
    written = draw_paper_figures(root, tmp_path / "out")
    fig8 = pd.read_csv(written["fig8_pythia.csv"])
    panels = dict(tuple(fig8.groupby("panel")))
    assert set(panels) == {"(a) with SFT: POS / NEG mean gradient norm",
                           "(b) without SFT: POS / NEG mean gradient norm", "(c) without SFT: G"}
    assert (panels["(a) with SFT: POS / NEG mean gradient norm"]["mean"] == 1.0).all()  # the run with SFT
    assert (panels["(b) without SFT: POS / NEG mean gradient norm"]["mean"] == 100.0).all()  # the run without
    c = panels["(c) without SFT: G"].set_index(["series", "step"])["mean"]
    assert c[("TOT", 20)] == 100 * 20 and c[("POS", 20)] == 100 * 2 * 20 and c[("NEG", 10)] == 100 * 3 * 10
    for name in ("fig1_pythia.csv", "fig5_pythia.csv", "fig6_pythia.csv", "fig9_pythia.csv"):
        table = pd.read_csv(written[name])
        assert table["mean"].abs().max() < 100 * 10, name  # nothing from the run without SFT


def test_g_figures_average_only_runs_of_one_setting(tmp_path, caplog):
    """A beta sweep's runs are not seeds of one curve: the runs of the default parameters are drawn, the others
    named in a warning."""
    from po_experiments.reporting.paper_figures import draw_paper_figures

    root = tmp_path / "paper"
    for seed in (0, 1):
        fake_run(root, "pythia", "dpo", seed)
    fake_run(root, "pythia", "dpo", 2, method="DPO (beta=0.2)")
    fig1 = pd.read_csv(draw_paper_figures(root, tmp_path / "out", only=["fig1"])["fig1_pythia.csv"])
    tot = fig1[fig1["series"] == "TOT"].set_index("step")
    assert tot.at[20, "n"] == 2 and tot.at[20, "mean"] == pytest.approx(1.5 * 20)
    assert "DPO (beta=0.2)" in caplog.text


def test_a_win_rate_figure_draws_its_presets_cases_only(tmp_path):
    """Fig. 4f draws hPPO cases 1-3; Fig. 17's extra hPPO runs in the same pool are drawn by Fig. 17 alone."""
    from po_experiments.reporting.paper_figures import draw_paper_figures

    root = tmp_path / "paper"
    for method, label, variant in (("ppo", "PPO", "baseline"), ("hppo_case1", "hPPO (t3=2, tau=0.08)", "hppo"),
                                   ("hppo_t3_large", "hPPO (t3=400, tau=0.08)", "hppo")):
        fake_run(root, "pythia", "ppo", 0, variant=variant, method=label,
                 overrides=[f"experiment/method={method}", "experiment/model=pythia", "seed=0"])
    written = draw_paper_figures(root, tmp_path / "out", only=["fig4", "fig17"])
    fig4 = pd.read_csv(written["fig4_pythia_gold.csv"])
    fig17 = pd.read_csv(written["fig17_pythia_gold.csv"])
    assert set(fig4["method"]) == {"PPO", "hPPO (t3=2, tau=0.08)"}
    assert set(fig17["method"]) == {"PPO", "hPPO (t3=2, tau=0.08)", "hPPO (t3=400, tau=0.08)"}
