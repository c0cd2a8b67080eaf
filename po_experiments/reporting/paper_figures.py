"""The paper's figures from a pool of runs (what the presets in conf/experiment/ leave in outputs/paper/).

`FIGURES` maps each paper figure to what it draws and from which runs; `draw_paper_figures(root, out)` draws every
figure the runs under `root` can feed, once per model, as `<id>_<model>.png` plus `<id>_<model>.csv` holding the
numbers drawn (win-rate figures: `<id>_<model>_<judge>`). A figure is drawn for the model(s) it shows in the paper
(Fig. 1 for Pythia, Fig. 10 for Qwen3, ...) and for any model the paper does not use (the tiny model of
`mode=fast` gets every figure). Table 1 and the Fig. 4 panels of every model come from `aggregate.aggregate`.

Runs are told apart by their summary.json (model, family, variant = baseline / cdpo / cppo / ... / ablation,
seed) and by the analysis settings of each G table: a run's own `alignment.csv`, or `analysis_<key>/` of other
settings (analysis.variants: Fig. 7's D', scripts/analyse_run.py). G curves are the mean ± std over the runs (seeds) of a model, family and D';
the per-run figures of `analysis/plots.py` draw the same quantities for one run.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from ..analysis import plots, variants
from .aggregate import Run, checkpoint_rates, curves, find_runs, identity_name, panels, training_runs
from .figures import panels_figure

log = logging.getLogger(__name__)
PAPER_MODELS = ("pythia", "qwen3", "llama3")
FAMILY_LABEL = {"dpo": "DPO", "ppo": "PPO"}
LEFT_OUT = "left out (App. A)"  # CSV rows: checkpoints whose next update increased L, per step: how many runs


@dataclass(frozen=True)
class PaperFigure:
    id: str
    title: str
    kind: str  # components | advantages | grad_norms | filtering | in_distribution | no_sft | layers | win_rate
    models: tuple[str, ...]  # the paper's model(s) for this figure
    families: tuple[str, ...] = ("dpo", "ppo")
    letters: str = ""  # win_rate: Fig. 4's panels drawn (a-f)


FIGURES = {f.id: f for f in (
    PaperFigure("fig1", "DPO learning dynamics", "components", ("pythia",), ("dpo",)),
    PaperFigure("fig2", "PPO learning dynamics", "components", ("pythia",), ("ppo",)),
    PaperFigure("fig3", "average (raw) advantages of the |A| thirds during PPO", "advantages", ("pythia",), ("ppo",)),
    PaperFigure("fig4", "performance under ablation", "win_rate", ("pythia",), letters="abcdef"),
    PaperFigure("fig5", "gradient magnitudes per mini-batch", "grad_norms", ("pythia",)),
    PaperFigure("fig6", "G with and without outlier filtering", "filtering", ("pythia",)),
    PaperFigure("fig7", "DPO with an in-distribution D' (training prompts)", "in_distribution", ("pythia",), ("dpo",)),
    PaperFigure("fig8", "DPO with and without SFT", "no_sft", ("pythia",), ("dpo",)),
    PaperFigure("fig9", "layer-wise learning dynamics", "layers", ("pythia",)),
    PaperFigure("fig10", "learning dynamics", "components", ("qwen3",)),
    PaperFigure("fig11", "performance under ablation", "win_rate", ("qwen3",), letters="abcdef"),
    PaperFigure("fig12", "DPO vs cDPO", "win_rate", ("pythia",), letters="c"),
    PaperFigure("fig13", "DPO vs cDPO", "win_rate", ("qwen3",), letters="c"),
    PaperFigure("fig14", "PPO vs cPPO (top, middle)", "win_rate", ("pythia",), letters="de"),
    PaperFigure("fig15", "PPO vs cPPO (top, middle)", "win_rate", ("qwen3",), letters="de"),
    PaperFigure("fig16", "PPO vs cPPO (top, middle)", "win_rate", ("llama3",), letters="de"),
    PaperFigure("fig17", "PPO vs hPPO", "win_rate", ("pythia",), letters="f"),
    PaperFigure("fig18", "PPO vs hPPO", "win_rate", ("qwen3",), letters="f"),
    PaperFigure("fig19", "PPO vs hPPO", "win_rate", ("llama3",), letters="f"),
)}


# ============================================================================================ data


@dataclass
class Analysed:
    """One G table of a run: its own (`alignment.csv` in the run dir), or one of other analysis settings in
    `analysis_<key>/` (analysis.variants), told apart by the settings recorded beside each table."""

    run: Run
    dprime: str
    alignment: pd.DataFrame
    minibatches: pd.DataFrame | None
    folder: Path | None = None
    settings: dict = field(default_factory=dict)  # alignment_settings.json ({} for tables written before it)

    @property
    def own(self) -> bool:
        return self.folder is None or self.folder == self.run.dir


def analysed_runs(runs: list[Run]) -> list[Analysed]:
    """Every G table of every run: the run dir's own and each `analysis_*/` folder's."""
    found = []
    for run in runs:
        for folder in (run.dir, *sorted(p for p in run.dir.glob(f"{variants.PREFIX}*") if p.is_dir())):
            table = plots.load_alignment(folder)
            if table is None or table.empty:
                continue
            settings = variants.recorded_settings(folder) or {}
            dprime = settings.get("dprime") or (str(table["dprime"].dropna().iloc[0]) if "dprime" in table
                                                else "heldout")
            found.append(Analysed(run, dprime, table, plots.load_minibatches(folder), folder, settings))
    return found


def select(tables: list[Analysed], model: str, family: str, dprime: str = "heldout", *,
           sft: bool = True) -> list[Analysed]:
    """The plain (baseline) runs of a model and family whose G used this D' (`sft=False`: the runs without SFT
    instead, Fig. 8 b, c, which no other figure uses), one table per run (no run counted twice): the run's own
    table if it used this D'; else the one analysed with the own table's settings but this D' (Fig. 7 on Fig. 1's
    runs); else the first by folder name."""
    variant = "baseline" if sft else "no_sft"
    wanted = [a for a in tables if (a.run.summary["model"], a.run.summary["family"], a.run.summary["variant"],
                                    a.run.summary.get("sft", True), a.dprime) == (model, family, variant, sft, dprime)]
    chosen = one_per_run(wanted, tables)
    return one_setting(chosen, f"{model} {family}")


def one_per_run(wanted: list[Analysed], tables: list[Analysed]) -> list[Analysed]:
    """One of the `wanted` tables per trained model (a dir named before by its analysis settings,
    aggregate.training_runs, is its twin's model): the run's own table if wanted; else the one analysed with the own
    table's settings but another D' (Fig. 7 on Fig. 1's runs); else the first by folder name. `tables`: every table
    of the runs (their own ones give the settings)."""
    candidates: dict[tuple, list[Analysed]] = {}
    own = {a.run.dir: a.settings for a in tables if a.own}
    for a in wanted:
        candidates.setdefault((a.run.dir.parent, identity_name(a.run.dir)), []).append(a)

    def rank(a: Analysed) -> tuple:
        ref = own.get(a.run.dir) or {}
        same_but_dprime = {k: v for k, v in a.settings.items() if k != "dprime"} == \
            {k: v for k, v in ref.items() if k != "dprime"}
        return not a.own, not same_but_dprime, str(a.folder)

    return [min(found, key=rank) for found in candidates.values()]


def one_setting(tables: list[Analysed], what: str) -> list[Analysed]:
    """Runs averaged as seeds must share their algorithm parameters: with several (a beta sweep), the runs of the
    schema's defaults (label "DPO" / "PPO"), else of the most common label; the others are named and left out."""
    labels = [a.run.summary.get("method") for a in tables]
    if len(set(labels)) <= 1:
        return tables
    plain = {FAMILY_LABEL.get(a.run.summary["family"]) for a in tables}
    keep = next((label for label in labels if label in plain), max(set(labels), key=labels.count))
    log.warning("%s: runs with other parameters than %r left out of the G figures: %s", what, keep,
                sorted({label for label in labels if label != keep}))
    return [a for a, label in zip(tables, labels) if label == keep]


@functools.lru_cache(maxsize=None)
def excludes_loss_increase(run_dir: Path) -> bool:
    """The run's `analysis.exclude_loss_increase` (App. A; default on, as the paper applied it)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return True
    return bool(OmegaConf.select(OmegaConf.load(path), "analysis.exclude_loss_increase", default=True))


def mean_series(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """(step, value) frames of several runs -> step, mean, std (ddof 1), n."""
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["step", "mean", "std", "n"])
    data = pd.concat(frames, ignore_index=True)
    return data.groupby("step")["value"].agg(mean="mean", std="std", n="size").reset_index()


def g_series(tables: list[Analysed], component: str, *, layer_group: str = "all", column: str = "G") -> pd.DataFrame:
    """mean ± std over the runs; G (not gradient norms: App. A filters "when computing G") without the checkpoints
    App. A's filter leaves out in each run where it is on."""
    return mean_series([plots.curve_data(a.alignment, component, layer_group=layer_group, column=column,
                                         exclude_loss_increase=is_g(column) and excludes_loss_increase(a.run.dir))
                        for a in tables])


def is_g(column: str) -> bool:
    return column in ("G", "G_unfiltered")


def left_out_steps(tables: list[Analysed]) -> pd.DataFrame:
    """step, n: how many of the runs App. A's filter left out at each step (steps none left out are absent)."""
    steps = [s for a in tables if excludes_loss_increase(a.run.dir) for s in plots.excluded_steps(a.alignment)]
    return pd.Series(steps, dtype=int).value_counts().rename_axis("step").reset_index(name="n").sort_values("step")


def advantage_series(runs: list[Run]) -> dict[str, pd.DataFrame]:
    """Fig. 3: per series of `plots.ADVANTAGE_KEYS` (whitened thirds first, then un-whitened), the mean over runs."""
    histories = [plots.advantage_history(h) for h in (plots.load_log_history(r.dir) for r in runs) if h]
    series = {k: mean_series([h[["step", k]].dropna().rename(columns={k: "value"}) for h in histories])
              for k in plots.ADVANTAGE_KEYS}
    return {k: v for k, v in series.items() if not v.empty}


# ============================================================================================ panels


@dataclass
class Panel:
    title: str
    axis: str = "symlog"  # symlog (G) | log (norms) | linear | scatter (mini-batch norms) | note
    series: dict[str, pd.DataFrame] = field(default_factory=dict)  # label -> step, mean, std, n
    styles: dict[str, tuple[str, str]] = field(default_factory=dict)
    points: pd.DataFrame | None = None  # scatter: step, grad_norm, outlier
    ylabel: str = "gradient alignment G"
    note: str = ""
    left_out: pd.DataFrame | None = None  # G panels: step, n runs whose checkpoint App. A's filter left out

    @property
    def empty(self) -> bool:
        return all(s.empty for s in self.series.values()) and (self.points is None or self.points.empty)


def curve_panel(tables, title: str, keys, *, column: str = "G", layer_groups: bool = False, axis: str = "symlog",
           ylabel: str = "gradient alignment G") -> Panel:
    """One panel of mean ± std curves: components (TOT, POS, ...) or, with layer_groups, TOT per layer group."""
    series = {k: g_series(tables, "TOT", layer_group=k, column=column) if layer_groups else
              g_series(tables, k, column=column) for k in keys}
    styles = plots.LAYER_STYLE if layer_groups else plots.COMPONENT_STYLE
    return Panel(title, axis, series, {k: styles[k] for k in keys}, ylabel=ylabel,
                 left_out=left_out_steps(tables) if is_g(column) else None)


def norm_panel(tables, title: str = "POS / NEG mean gradient norm") -> Panel:
    return curve_panel(tables, title, ("POS", "NEG"), column="grad_norm", axis="log",
                  ylabel="mean gradient norm (kept batches)")


def minibatch_points(tables) -> pd.DataFrame:
    frames = [plots.minibatch_norms(a.minibatches, "TOT") for a in tables if a.minibatches is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "grad_norm", "outlier"])


def _head(label: str, runs: list) -> str:
    return f"{label} ({len(runs)} run{'' if len(runs) == 1 else 's'})"


def rows_for(fig: PaperFigure, model: str, tables: list[Analysed], runs: list[Run]) -> list[tuple[str, list[Panel]]]:
    """(row label, panels) of a G figure for one model; rows without data are left out."""
    rows = []
    for family in fig.families:
        label = FAMILY_LABEL[family]
        if fig.kind == "advantages":
            chosen = [r for r in runs if r.summary["model"] == model and r.summary["family"] == family
                      and r.summary["variant"] == "baseline"]
            series = advantage_series(chosen)
            panel = Panel("mean raw (signed) advantage per |A| third", "linear", series,
                          {k: plots.advantage_style(k) for k in series}, ylabel="mean signed advantage")
            rows.append((_head(label, chosen), [panel]))
            continue
        chosen = select(tables, model, family, "train" if fig.kind == "in_distribution" else "heldout")
        tot_pos_neg = ("TOT", "POS", "NEG")
        if fig.kind == "components":  # Fig. 1 / 2 / 10
            row = [curve_panel(chosen, title, comps) for title, comps in plots.COMPONENT_PANELS]
        elif fig.kind == "layers":  # Fig. 9
            row = [curve_panel(chosen, "TOT, per layer group", plots.LAYER_STYLE, layer_groups=True)]
        elif fig.kind == "filtering":  # Fig. 6
            row = [curve_panel(chosen, "without outlier filtering", tot_pos_neg, column="G_unfiltered"),
                   curve_panel(chosen, "IQR outliers excluded", tot_pos_neg)]
        elif fig.kind == "grad_norms":  # Fig. 5 (PPO's analysis has no POS / NEG norms: that panel drops out)
            row = [Panel("TOT gradient norm per mini-batch", "scatter", points=minibatch_points(chosen),
                         ylabel="gradient norm of a mini-batch"), norm_panel(chosen)]
        elif fig.kind == "in_distribution":  # Fig. 7
            row = [norm_panel(chosen), curve_panel(chosen, "G, D' from training prompts", tot_pos_neg)]
        elif fig.kind == "no_sft":  # Fig. 8: (a) the runs with SFT, (b, c) the runs started from the base model
            without = select(tables, model, family, sft=False)
            row = [norm_panel(chosen, "(a) with SFT: POS / NEG mean gradient norm"),
                   norm_panel(without, "(b) without SFT: POS / NEG mean gradient norm"),
                   curve_panel(without, "(c) without SFT: G", tot_pos_neg)]
            rows.append((f"{label} ({len(chosen)} with SFT, {len(without)} without)", row))
            continue
        else:
            raise ValueError(f"unknown figure kind {fig.kind!r}")
        rows.append((_head(label, chosen), row))
    rows = [(label, [p for p in row if p.axis == "note" or not p.empty]) for label, row in rows]
    return [(label, row) for label, row in rows if any(p.axis != "note" for p in row)]


# ============================================================================================ drawing


def _band(ax, data: pd.DataFrame, label: str, style: tuple[str, str]) -> None:
    color, marker = style
    steps, mean = data["step"].to_numpy(float), data["mean"].to_numpy(float)
    spread = np.nan_to_num(data["std"].to_numpy(float))
    ax.plot(steps, mean, color=color, marker=marker, ms=4, lw=1.4, label=label)
    if spread.any():
        ax.fill_between(steps, mean - spread, mean + spread, color=color, alpha=0.15, linewidth=0)


def _draw_panel(ax, panel: Panel, linthresh: float | None) -> None:
    if panel.axis == "note":
        ax.text(0.5, 0.5, panel.note, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel.title, fontsize=10)
        return
    if panel.axis == "scatter":
        pts = panel.points
        steps = np.sort(pts["step"].unique()) if len(pts) else np.array([0.0])
        spacing = np.diff(steps).min() if len(steps) > 1 else 1.0
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(pts)) * spacing
        for flag, color, name in ((False, plots.NORMAL_COLOR, "normal"), (True, plots.OUTLIER_COLOR, "IQR outlier")):
            sel = (pts["outlier"] == flag).to_numpy()
            ax.scatter(pts["step"].to_numpy(float)[sel] + jitter[sel], pts["grad_norm"].to_numpy(float)[sel], s=12,
                       color=color, alpha=0.7, lw=0, label=f"{name} ({int(sel.sum())})")
        plots._log_axis(ax, pts["grad_norm"])
        plots._step_axis(ax, steps)
    else:
        values = pd.concat([s["mean"] for s in panel.series.values()]) if panel.series else pd.Series(dtype=float)
        if panel.axis == "symlog":
            plots._symlog_axis(ax, linthresh or 1.0, values)
        for label, data in panel.series.items():
            if not data.empty:
                _band(ax, data, label, panel.styles[label])
        if panel.axis == "log":
            plots._log_axis(ax, values)
        elif panel.axis == "linear":
            ax.axhline(0.0, color="0.3", lw=0.8)
            ax.grid(True, color="0.9", lw=0.5)
        steps = pd.concat([s["step"] for s in panel.series.values()]) if panel.series else []
        left_out = panel.left_out["step"] if panel.left_out is not None else pd.Series(dtype=float)
        for i, step in enumerate(left_out):  # App. A: dotted where a run's checkpoint was left out
            ax.axvline(step, color="0.55", ls=":", lw=1.2, zorder=0, label="left out (L rose)" if i == 0 else None)
        plots._step_axis(ax, pd.concat([pd.Series(steps, dtype=float), left_out.astype(float)]),
                         "PPO update" if panel.axis == "linear" else "training step")
    ax.set_ylabel(panel.ylabel)
    plots._panel_title(ax, panel.title)
    plots._legend(ax, max_cols=4)


def g_figure(title: str, rows: list[tuple[str, list[Panel]]]) -> Figure:
    ncols = max(len(p) for _, p in rows)
    fig = Figure(figsize=(plots.PANEL_SIZE[0] * max(ncols, 1.6), (plots.PANEL_SIZE[1] + 0.3) * len(rows) + 0.6))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (label, row) in enumerate(rows):
        g_values = pd.concat([s["mean"] for p in row if p.axis == "symlog" for s in p.series.values()] or
                             [pd.Series(dtype=float)])
        linthresh = plots.choose_linthresh(g_values)  # one linear range per row: DPO's and PPO's G differ in scale
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            _draw_panel(ax, row[c], linthresh)
            if c == 0:
                ax.set_ylabel(f"{label}\n{ax.get_ylabel()}")
    note = "mean ± std over runs (seeds)"
    left_out = sorted({int(s) for _, row in rows for p in row if p.left_out is not None for s in p.left_out["step"]})
    if left_out:
        note += f"; G leaves out step(s) {', '.join(map(str, left_out))} of some run(s): their next update raised L " \
                "(App. A)"
    if any(p.axis == "symlog" for _, row in rows for p in row):
        note += "; G on a symmetric log axis, grey band = its linear range"
    fig.suptitle(f"{title}\n({note})", fontsize=11)
    fig.tight_layout()
    return fig


def panels_table(fig_id: str, model: str, rows: list[tuple[str, list[Panel]]]) -> pd.DataFrame:
    """The numbers a G figure draws, one row per (row, panel, series, step)."""
    records = []
    for label, row in rows:
        family = label.split()[0]
        for panel in row:
            for series, data in panel.series.items():
                for rec in data.to_dict("records"):
                    records.append({"figure": fig_id, "model": model, "family": family, "panel": panel.title,
                                    "series": series, **rec})
            if panel.points is not None:
                for rec in panel.points.to_dict("records"):
                    records.append({"figure": fig_id, "model": model, "family": family, "panel": panel.title,
                                    "series": "minibatch", "step": rec["step"], "mean": rec["grad_norm"],
                                    "std": np.nan, "n": 1, "outlier": bool(rec["outlier"])})
            for rec in (panel.left_out.to_dict("records") if panel.left_out is not None else []):
                records.append({"figure": fig_id, "model": model, "family": family, "panel": panel.title,
                                "series": LEFT_OUT, "step": rec["step"], "mean": np.nan, "std": np.nan,
                                "n": rec["n"]})
    return pd.DataFrame(records)


# ============================================================================================ entry


def figure_models(fig: PaperFigure, present) -> list[str]:
    """The models of the pool this figure is drawn for: its own paper model(s), and any non-paper model."""
    return [m for m in present if m in fig.models or m not in PAPER_MODELS]


def draw_paper_figures(root: Path, out: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Every figure of FIGURES (or of `only`) that the runs under `root` can feed; returns name -> path."""
    every = find_runs(root)
    runs = training_runs(every)  # win rates and advantages: each trained model once
    tables = analysed_runs(every)  # G: every D' (Fig. 7 reads the dprime=train tables)
    present = list(dict.fromkeys(r.summary["model"] for r in every))
    out.mkdir(parents=True, exist_ok=True)
    rates = checkpoint_rates(runs) if any(not r.win_rates.empty for r in runs) else None
    written: dict[str, Path] = {}
    for fig in FIGURES.values():
        if only and fig.id not in only:
            continue
        for model in figure_models(fig, present):
            if fig.kind == "win_rate":
                curve = curves(of_preset(rates, fig.id)) if rates is not None else None
                written.update(_win_rate_figure(fig, model, curve, out))
                continue
            rows = rows_for(fig, model, tables, runs)
            if not rows:
                continue
            title = f"Fig. {fig.id[3:]} ({model}): {fig.title}"
            path = out / f"{fig.id}_{model}.png"
            g_figure(title, rows).savefig(path, dpi=110, bbox_inches="tight")
            panels_table(fig.id, model, rows).to_csv(path.with_suffix(".csv"), index=False, float_format="%.10g")
            written[path.name] = path
            written[path.with_suffix(".csv").name] = path.with_suffix(".csv")
    return written


PRESETS = Path(__file__).resolve().parents[2] / "conf" / "experiment"


@functools.lru_cache(maxsize=None)
def preset_methods(fig_id: str) -> frozenset[str] | None:
    """The `experiment/method` values a figure's preset sweeps (conf/experiment/<id>.yaml), None without one."""
    path = PRESETS / f"{fig_id}.yaml"
    if not path.exists():
        return None
    value = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default={}).get("experiment/method")
    return frozenset(m.strip() for m in str(value).split(",")) if value else None


@functools.lru_cache(maxsize=None)
def sweep_method(run: str) -> str | None:
    """The `experiment/method` a run dir was launched with (its .hydra/overrides.yaml), None for other runs."""
    path = Path(run) / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(path) if path.exists() else []
    return next((str(o).split("=", 1)[1] for o in overrides if str(o).startswith("experiment/method=")), None)


def of_preset(rates: pd.DataFrame, fig_id: str) -> pd.DataFrame:
    """A win-rate figure draws its preset's cases (Fig. 4f: hPPO cases 1-3), not every run of a variant the pool
    holds (Fig. 17's tau = 0.5 / t3 = 400 hPPO runs); runs launched without a preset are all drawn."""
    allowed = preset_methods(fig_id)
    if allowed is None:
        return rates
    keep = rates["run"].map(lambda run: sweep_method(run) in allowed if sweep_method(run) else True)
    return rates[keep]


def _win_rate_figure(fig: PaperFigure, model: str, curve: pd.DataFrame | None, out: Path) -> dict[str, Path]:
    written = {}
    if curve is None:
        return written
    for judge in dict.fromkeys(curve.loc[curve["model"] == model, "judge"]):
        chosen = [(t, d) for t, d in panels(curve, judge, model) if t.startswith("(") and t[1] in fig.letters]
        if not chosen:
            continue
        path = out / f"{fig.id}_{model}_{judge}.png"
        title = f"Fig. {fig.id[3:]} ({model}): {fig.title}\nwin rate vs SFT (mean ± std over seeds; judge: {judge})"
        panels_figure(chosen, title=title).savefig(path, dpi=110, bbox_inches="tight")
        methods = {m for _, drawn in chosen for m in drawn}
        rows = curve[(curve["judge"] == judge) & (curve["model"] == model) & curve["method"].isin(methods)]
        rows.assign(figure=fig.id).to_csv(path.with_suffix(".csv"), index=False, float_format="%.3f")
        written[path.name] = path
        written[path.with_suffix(".csv").name] = path.with_suffix(".csv")
    if not written:
        log.info("%s: no %s runs of its panels (%s)", fig.id, model, fig.letters)
    return written


def describe_figures() -> str:
    return "\n".join(f"{f.id:6s} {f.title} [{', '.join(f.models)}]" for f in FIGURES.values())

