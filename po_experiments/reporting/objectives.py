"""Every objective side by side (`experiment=objectives`): a table of final win rate and final G, and a figure of G
over training, one panel per objective.

Reads only the output contract: each run's summary.json (model, family, method label, final_step), win_rate.csv
and its own G table (alignment.csv, the held-out D'). The runs are those of the preset's methods
(conf/experiment/objectives.yaml; runs launched without a preset all count) that have a G table, except ablations
and runs without SFT; each method label (an objective with its parameters) is a row, its runs averaged as seeds.

- `objectives.csv` / `.md` / `objectives_<judge>.png`: per judge, model and method, mean ± std over seeds of the
  final win rate and of the final checkpoint's G (all layers, IQR-filtered: the `G` column the figures draw) of TOT,
  POS, NEG and of each component that is neither (NLL, KL) where the objective has one.
- `objectives_G_<model>.png` / `.csv`: G of TOT / POS / NEG (+ extras) over checkpoints, x = step / final_step
  (pairwise steps and PPO updates differ), mean ± std over seeds, App. A's left-out checkpoints excluded as in the
  paper figures; one shared symlog y scale so panels compare.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis import plots
from ..objectives import BASE_COMPONENTS, OBJECTIVES
from .aggregate import MODEL_ORDER, final_rates, find_runs
from .figures import table_figure
from .paper_figures import (Analysed, _band, analysed_runs, excludes_loss_increase, one_per_run, preset_methods,
                            sweep_method)

log = logging.getLogger(__name__)
PRESET = "objectives"
SHOWN = ("TOT", "POS", "NEG")  # the table's and figure's components, then the objective's own (NLL, KL)
EXTRA_STYLE = {"NLL": ("#8c564b", "X"), "KL": ("#e377c2", "*")}
OTHER_STYLE = ("#7f7f7f", "h")  # an extra component without a style of its own


def is_objective_run(summary: dict, run_dir: Path) -> bool:
    """A run of one of the preset's methods (or launched without a preset) training a whole objective: not an
    ablation, not a run without SFT, not a plain DPO / PPO restricted to some components (variant == family)."""
    variant = summary.get("variant")
    if variant in ("ablation", "no_sft") or variant == summary.get("family"):
        return False
    allowed = preset_methods(PRESET)
    launched = sweep_method(str(run_dir))
    return allowed is None or launched is None or launched in allowed


def objective_tables(tables: list[Analysed]) -> list[Analysed]:
    """One held-out-D' G table per trained objective run (its own where it has one)."""
    chosen = [a for a in tables if a.dprime == "heldout" and is_objective_run(a.run.summary, a.run.dir)]
    return one_per_run(chosen, tables)


def extra_components(tables: list[Analysed]) -> list[str]:
    """The components of these G tables that are neither side nor rank third (NLL, KL), in order of appearance."""
    found = [c for a in tables for c in a.alignment["component"].unique() if c not in BASE_COMPONENTS]
    return list(dict.fromkeys(found))


def _order_key(a: Analysed) -> tuple:
    s = a.run.summary
    registered = list(OBJECTIVES)
    algo = s.get("algo")
    return (MODEL_ORDER.index(s["model"]) if s["model"] in MODEL_ORDER else len(MODEL_ORDER), s["model"],
            {"dpo": 0, "ppo": 1}.get(s.get("family"), 2), algo != s.get("family"),  # DPO / PPO first
            registered.index(algo) if algo in registered else len(registered), s["method"])


def final_g(alignment: pd.DataFrame, component: str) -> float:
    """G at the run's final checkpoint (the table's largest step), all layers; G is NaN where the component
    has no row there. The final model has no next update, so App. A's filter never applies to it."""
    last = int(alignment["step"].max())
    rows = alignment[(alignment["component"] == component) & (alignment["layer_group"] == "all")
                     & (alignment["step"] == last)]
    return float(rows["G"].mean()) if len(rows) else math.nan


def run_rows(tables: list[Analysed], extras: list[str]) -> pd.DataFrame:
    """One row per (run, judge): the run's final win rate and its final checkpoint's G of each shown component."""
    records = []
    for a in sorted(tables, key=_order_key):
        s = a.run.summary
        finals = {c: final_g(a.alignment, c) for c in (*SHOWN, *extras)}
        base = {"model": s["model"], "family": s["family"], "algo": s.get("algo"), "method": s["method"],
                "seed": s["seed"], "run": str(a.run.dir), "g_step": int(a.alignment["step"].max()),
                **{f"G_{c}": value for c, value in finals.items()}}
        rates = final_rates(a.run.win_rates.assign(run=str(a.run.dir))) if not a.run.win_rates.empty else None
        if rates is None or rates.empty:
            records.append({**base, "judge": "none", "win_rate": math.nan, "win_rate_step": None})
            continue
        for rec in rates.to_dict("records"):
            records.append({**base, "judge": rec["judge"], "win_rate": rec["win_rate"],
                            "win_rate_step": int(rec["step"])})
    return pd.DataFrame(records)


def objectives_table(per_run: pd.DataFrame, extras: list[str]) -> pd.DataFrame:
    """mean ± std (ddof 1) over seeds per (judge, model, method), in the runs' order (model, family, registry)."""
    values = ["win_rate", *(f"G_{c}" for c in (*SHOWN, *extras))]
    grouped = per_run.groupby(["judge", "model", "family", "method"], sort=False, dropna=False)
    rows = []
    for (judge, model, family, method), group in grouped:
        row = {"judge": judge, "model": model, "family": family, "method": method, "n_seeds": len(group),
               "seeds": " ".join(str(x) for x in sorted(group["seed"])),
               "g_steps": " ".join(sorted({str(int(x)) for x in group["g_step"].dropna()}, key=int))}
        for v in values:
            row[f"{v}_mean"], row[f"{v}_std"] = group[v].mean(), group[v].std()
            row[f"{v}_n"] = int(group[v].notna().sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _g_cell(mean: float, std: float, n: int) -> str:
    """Three significant digits of the mean and the std to the same decimal place (G spans decades)."""
    if n == 0 or math.isnan(mean):
        return "—"
    if mean != 0 and not 1e-3 <= abs(mean) < 1e4:
        text, spread = f"{mean:.2e}", f"{std:.1e}"
    else:
        decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean != 0 else 3
        text, spread = f"{mean:.{decimals}f}", f"{std:.{decimals}f}"
    return f"{text} ± {spread}" if n > 1 else f"{text} (1 seed)"


def _rate_cell(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f} (1 seed)"


def table_cells(row, extras: list[str]) -> list[str]:
    """A table row's cells: method, n seeds, win rate, G of TOT / POS / NEG and of each extra ("—" where none)."""
    cells = [row["method"], str(row["n_seeds"]),
             _rate_cell(row["win_rate_mean"], row["win_rate_std"], row["win_rate_n"])]
    for c in (*SHOWN, *extras):
        cells.append(_g_cell(row[f"G_{c}_mean"], row[f"G_{c}_std"], row[f"G_{c}_n"]))
    return cells


def headers(extras: list[str]) -> list[str]:
    return ["Objective", "seeds", "win rate vs SFT (%)", *(f"final G {c}" for c in (*SHOWN, *extras))]


def markdown(table: pd.DataFrame, extras: list[str]) -> str:
    parts = []
    for (judge, model), rows in table.groupby(["judge", "model"], sort=False):
        parts.append(f"### Objectives ({model}): final win rate vs SFT (judge: {judge}) and the final checkpoint's G\n")
        parts.append("mean ± std over seeds; G: all layers, IQR-filtered mini-batches, held-out D'; "
                     "an extra component only where the objective has one.\n")
        head = headers(extras)
        parts.append("| " + " | ".join(head) + " |")
        parts.append("|---|" + "---:|" * (len(head) - 1))
        for _, row in rows.iterrows():
            parts.append("| " + " | ".join(table_cells(row, extras)) + " |")
        parts.append("")
    return "\n".join(parts)


# ============================================================================================ G over training


def fraction_series(tables: list[Analysed], component: str) -> pd.DataFrame:
    """fraction (step / final_step), step, mean, std (ddof 1), n over the runs of G (all layers, filtered, App. A's
    left-out checkpoints excluded where the run has the filter on)."""
    frames = []
    for a in tables:
        data = plots.curve_data(a.alignment, component, exclude_loss_increase=excludes_loss_increase(a.run.dir))
        if data.empty:
            continue
        length = a.run.summary.get("final_step") or a.alignment["step"].max()
        frames.append(data.assign(fraction=(data["step"] / length).round(6)))
    if not frames:
        return pd.DataFrame(columns=["fraction", "step", "mean", "std", "n"])
    data = pd.concat(frames, ignore_index=True)
    return data.groupby("fraction").agg(step=("step", "min"), mean=("value", "mean"), std=("value", "std"),
                                        n=("value", "size")).reset_index()


def style(component: str) -> tuple[str, str]:
    return plots.COMPONENT_STYLE.get(component) or EXTRA_STYLE.get(component, OTHER_STYLE)


def g_panels(tables: list[Analysed]) -> list[tuple[str, dict[str, pd.DataFrame]]]:
    """(method label with its seed count, component -> series) per method, in the table's order."""
    by_method: dict[str, list[Analysed]] = {}
    for a in sorted(tables, key=_order_key):
        by_method.setdefault(a.run.summary["method"], []).append(a)
    panels = []
    for method, runs in by_method.items():
        comps = [*SHOWN, *extra_components(runs)]
        series = {c: fraction_series(runs, c) for c in comps}
        series = {c: s for c, s in series.items() if not s.empty}
        if series:
            panels.append((f"{method} ({len(runs)} run{'' if len(runs) == 1 else 's'})", series))
    return panels


def g_figure(panels: list[tuple[str, dict[str, pd.DataFrame]]], *, title: str) -> Figure:
    """Small multiples: one panel per objective, one shared symlog y scale (one linear range for all)."""
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.7 * cols, 3.2 * rows + 0.8))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharey=True)).ravel()
    values = pd.concat([s["mean"] for _, series in panels for s in series.values()])
    linthresh = plots.choose_linthresh(values)
    for i, (ax, (panel_title, series)) in enumerate(zip(axes, panels)):
        plots._symlog_axis(ax, linthresh, values)
        for component, data in series.items():
            _band(ax, data.rename(columns={"fraction": "step", "step": "checkpoint"}), component, style(component))
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("fraction of the run (step / final step)")
        ax.set_ylabel("gradient alignment G" if i % cols == 0 else "")
        plots._panel_title(ax, panel_title)
        plots._legend(ax, max_cols=4)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n(mean ± std over seeds; G on a shared symmetric log axis, grey band: |G| < {linthresh:g};"
                 f"\ncheckpoints whose next update raised L left out, App. A)", fontsize=10)
    fig.tight_layout()
    return fig


def g_table(model: str, panels: list[tuple[str, dict[str, pd.DataFrame]]]) -> pd.DataFrame:
    records = [{"model": model, "panel": panel, "component": c, **rec}
               for panel, series in panels for c, data in series.items() for rec in data.to_dict("records")]
    return pd.DataFrame(records, columns=["model", "panel", "component", "fraction", "step", "mean", "std", "n"])


# ============================================================================================ entry


def draw_objectives(root: Path, out: Path) -> dict[str, Path]:
    """The objectives table and G figure(s) of the runs under `root`; {} when none of them has a G table."""
    tables = objective_tables(analysed_runs(find_runs(root)))
    if not tables:
        log.info("objectives: no run of the objectives preset with a G table under %s", root)
        return {}
    extras = extra_components(tables)
    table = objectives_table(run_rows(tables, extras), extras)
    out.mkdir(parents=True, exist_ok=True)
    written = {name: out / name for name in ("objectives.csv", "objectives.md")}
    table.to_csv(written["objectives.csv"], index=False, float_format="%.10g")
    written["objectives.md"].write_text(markdown(table, extras))
    for judge, rows in table[table["judge"] != "none"].groupby("judge", sort=False):
        path = out / f"objectives_{judge}.png"
        bars = rows.rename(columns={"win_rate_mean": "mean", "win_rate_std": "std"})
        table_figure(bars, title=f"Objectives: final win rate vs SFT (judge: {judge})").savefig(
            path, dpi=110, bbox_inches="tight")
        written[path.name] = path
    for model in dict.fromkeys(a.run.summary["model"] for a in sorted(tables, key=_order_key)):
        panels = g_panels([a for a in tables if a.run.summary["model"] == model])
        if not panels:
            continue
        path = out / f"objectives_G_{model}.png"
        g_figure(panels, title=f"Objectives ({model}): G of the components over training").savefig(
            path, dpi=110, bbox_inches="tight")
        g_table(model, panels).to_csv(path.with_suffix(".csv"), index=False, float_format="%.10g")
        written[path.name] = path
        written[path.with_suffix(".csv").name] = path.with_suffix(".csv")
    return written
