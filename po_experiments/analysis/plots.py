"""Figures of the gradient-alignment analysis (paper Fig. 1/2, 3, 5/7a, 6 and 9).

`draw_figures(run_dir)` reads the tables the analysis stage wrote into a run directory and writes PNGs under
`<run_dir>/figures/`:

- ``G_components.png``  Fig. 1 / 2: G of (a) TOT, (b) POS and NEG, (c) TOP, MID and BOT over training steps; an
  objective's own terms (an NLL anchor) dashed in (b), since POS + NEG + they = TOT.
- ``G_filtering.png``   Fig. 6: TOT G with and without IQR outlier filtering, plus the outlier counts.
- ``G_layers.png``      Fig. 9: TOT G restricted to all / bottom / middle / top layers.
- ``grad_norms.png``    Fig. 5 / 7a: per-mini-batch TOT gradient norms (outliers in red); POS / NEG mean norms.
- ``G_by_target.png``   beyond the paper: G of every component against every target (`analysis.targets`: D', the
  training y+ / y-, the SFT model's answers, unrelated answers), one row of the three panels of Fig. 1 per target.
- ``ppo_advantages.png`` Fig. 3 (PPO only): mean signed whitened advantage of the TOP / MID / BOT |A| thirds per
  update (the paper's "raw" = signed), and dashed the same tokens' mean advantage before whitening.

G spans several orders of magnitude and changes sign, so its axes use a symmetric log scale whose linear range
(shaded grey) is chosen from the data by `choose_linthresh`. The data selection is done by small pure functions
(`curve_data`, `outlier_counts`, `minibatch_norms`, `mean_norms`, `advantage_history`) so it can be tested apart
from the drawing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.ticker as ticker
from matplotlib.figure import Figure  # no pyplot: no global backend switch, no figure registry to leak
import numpy as np
import pandas as pd

from .tables import paper_target

DPI = 120
PANEL_SIZE = (4.6, 3.6)  # inches per panel

COMPONENT_STYLE = {  # one color and marker per component, shared by every figure
    "TOT": ("#222222", "o"),
    "POS": ("#2ca02c", "^"),
    "NEG": ("#d62728", "v"),
    "TOP": ("#9467bd", "s"),
    "MID": ("#ff7f0e", "D"),
    "BOT": ("#17becf", "P"),
}
EXTRA_STYLES = (("#8c564b", "X"), ("#e377c2", "*"), ("#7f7f7f", "h"), ("#bcbd22", "p"))  # terms beyond the six
LAYER_STYLE = {
    "all": ("#222222", "o"),
    "bottom": ("#1b9e77", "v"),
    "middle": ("#d95f02", "D"),
    "top": ("#7570b3", "^"),
}
NORMAL_COLOR, OUTLIER_COLOR = "#1f77b4", "#d62728"
COMPONENT_PANELS = (("(a) overall", ("TOT",)), ("(b) positive / negative", ("POS", "NEG")),
                    ("(c) loss reweighting", ("TOP", "MID", "BOT")))
# Fig. 3's series (main first): the mean signed whitened A of each |A| third (the paper's "raw", i.e. signed,
# advantage of the A its loss uses), then the mean GAE before whitening over the same tokens (an extra series)
ADVANTAGE_KEYS = ("TOP", "MID", "BOT", "TOP unwhitened", "MID unwhitened", "BOT unwhitened")
ADVANTAGE_LOG_KEYS = {k: f"adv_unwhitened/{k.split()[0]}" if " " in k else f"adv/{k}" for k in ADVANTAGE_KEYS}
LEGACY_ADVANTAGE_KEYS = {f"{t} unwhitened": f"adv_raw/{t}" for t in ("TOP", "MID", "BOT")}  # logs before the split


def advantage_style(key: str) -> tuple[str, str]:
    """The third's color; the un-whitened series marked with crosses (and dashed where lines can be)."""
    color, marker = COMPONENT_STYLE[key.split()[0]]
    return (color, "x") if " " in key else (color, marker)


# ============================================================================================ loading

def _as_bool(series: pd.Series) -> pd.Series:
    """A CSV boolean column (True/False, true/false, 1/0, empty) as bool; empty counts as False."""
    if series.dtype == bool:
        return series
    text = series.astype(str).str.strip().str.lower()
    return text.isin(("true", "1", "1.0", "yes"))


def load_alignment(run_dir: Path, *, all_targets: bool = False) -> pd.DataFrame | None:
    """A run's G table: the rows against the paper's D' (`tables.paper_target`), or every target's rows."""
    path = Path(run_dir) / "alignment.csv"
    if not path.exists():
        return None
    df = pd.read_csv(path)
    if not all_targets:
        df = paper_target(df)
    # App. A's flag comes from the measured loss check (loss_before / loss_after); tables written before it existed
    # hold a flag from logged losses 1000 steps apart, which does not say what the update did: not used
    measured = "loss_before" in df
    df["loss_increased"] = _as_bool(df["loss_increased"]) if measured and "loss_increased" in df else False
    return df


def load_minibatches(run_dir: Path) -> pd.DataFrame | None:
    """Per-mini-batch G and norms against D' (the norms are the same for every target)."""
    path = Path(run_dir) / "alignment_minibatches.csv"
    if not path.exists():
        return None
    df = paper_target(pd.read_csv(path))
    df["outlier"] = _as_bool(df["outlier"])
    return df


def load_log_history(run_dir: Path) -> list[dict] | None:
    path = Path(run_dir) / "model" / "log_history.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def algo_family(alignment: pd.DataFrame | None) -> str:
    """'DPO' / 'PPO' from the table's algo_family column ('' when unknown)."""
    if alignment is None or "algo_family" not in alignment or alignment["algo_family"].dropna().empty:
        return ""
    return str(alignment["algo_family"].dropna().iloc[0]).upper()


# ===================================================================================== data selection

def extra_components(alignment: pd.DataFrame) -> list[str]:
    """The objective's own components in the table (an NLL anchor, ...): neither side nor third, in table order."""
    return [c for c in alignment["component"].drop_duplicates() if c not in COMPONENT_STYLE]


def component_panels(alignment: pd.DataFrame) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Fig. 1 / 2's panels with the objective's own terms beside POS and NEG in (b): together they add up to TOT."""
    extras = tuple(extra_components(alignment))
    return tuple((name + "".join(f" / {e}" for e in extras), comps + extras) if comps == ("POS", "NEG")
                 else (name, comps) for name, comps in COMPONENT_PANELS)


def component_style(component: str, extras: list[str]) -> tuple[str, str]:
    if component in COMPONENT_STYLE:
        return COMPONENT_STYLE[component]
    return EXTRA_STYLES[extras.index(component) % len(EXTRA_STYLES)]


def curve_data(alignment: pd.DataFrame, component: str = "TOT", *, layer_group: str = "all", column: str = "G",
               exclude_loss_increase: bool = False) -> pd.DataFrame:
    """The points of one G curve: columns `step`, `value`, sorted by step, NaN values dropped.

    With `exclude_loss_increase`, checkpoints whose training loss rose since the previous one are left out
    (paper App. A)."""
    rows = alignment[(alignment["component"] == component) & (alignment["layer_group"] == layer_group)]
    if exclude_loss_increase:
        rows = rows[~_as_bool(rows["loss_increased"])]
    out = rows[["step", column]].rename(columns={column: "value"}).dropna()
    out = out.groupby("step", as_index=False)["value"].mean()
    return out.sort_values("step").reset_index(drop=True)


def loss_check_table(alignment: pd.DataFrame, exclude_loss_increase: bool) -> pd.DataFrame:
    """Per checkpoint: L on the G sample before / after its next update, whether it rose, and whether the G figures
    leave it out (App. A)."""
    columns = [c for c in ("loss_before", "loss_after") if c in alignment]
    table = alignment.groupby("step", as_index=False).agg({**{c: "first" for c in columns}, "loss_increased": "any"})
    return table.assign(excluded=table["loss_increased"] & exclude_loss_increase)


def excluded_steps(alignment: pd.DataFrame) -> list[int]:
    """Checkpoint steps that `exclude_loss_increase` removes."""
    return sorted(int(s) for s in alignment.loc[_as_bool(alignment["loss_increased"]), "step"].unique())


def outlier_counts(alignment: pd.DataFrame, *, exclude_loss_increase: bool = False) -> pd.DataFrame:
    """Per step: `n_batches` and `n_outliers` of the TOT / all rows."""
    rows = alignment[(alignment["component"] == "TOT") & (alignment["layer_group"] == "all")]
    if exclude_loss_increase:
        rows = rows[~_as_bool(rows["loss_increased"])]
    return rows.groupby("step", as_index=False)[["n_batches", "n_outliers"]].max().sort_values("step")


def minibatch_norms(minibatches: pd.DataFrame, component: str = "TOT") -> pd.DataFrame:
    """Per-mini-batch gradient norms of one component (`step`, `batch`, `grad_norm`, `outlier`), positive only
    (they go on a log axis)."""
    rows = minibatches[minibatches["component"] == component]
    rows = rows[np.isfinite(rows["grad_norm"]) & (rows["grad_norm"] > 0)]
    rows = rows.assign(outlier=_as_bool(rows["outlier"]))
    return rows[["step", "batch", "grad_norm", "outlier"]].sort_values(["step", "batch"]).reset_index(drop=True)


def mean_norms(alignment: pd.DataFrame | None, minibatches: pd.DataFrame, component: str) -> pd.DataFrame:
    """Mean gradient norm of a component per step over the kept (non-outlier) mini-batches: `step`, `value`.

    Taken from alignment.csv (layer group all) where it is there, else averaged from the mini-batch table."""
    if alignment is not None and "grad_norm" in alignment:
        out = curve_data(alignment, component, column="grad_norm")
        if not out.empty:
            return out
    rows = minibatches[(minibatches["component"] == component) & ~_as_bool(minibatches["outlier"])]
    out = rows.groupby("step", as_index=False)["grad_norm"].mean().dropna()
    return out.rename(columns={"grad_norm": "value"}).sort_values("step").reset_index(drop=True)


def advantage_history(log_history: list[dict]) -> pd.DataFrame:
    """Fig. 3's data: columns `step` and ADVANTAGE_KEYS from the log entries that carry any of them (NaN where an
    entry lacks one; logs written before the whitened series existed have `adv_raw/*`, the un-whitened means).
    The last entry wins if a resumed run logged a step twice."""
    def value(e: dict, k: str):
        return e.get(ADVANTAGE_LOG_KEYS[k], e.get(LEGACY_ADVANTAGE_KEYS.get(k), float("nan")))

    logged = set(ADVANTAGE_LOG_KEYS.values()) | set(LEGACY_ADVANTAGE_KEYS.values())
    rows = [{"step": e["step"], **{k: value(e, k) for k in ADVANTAGE_KEYS}}
            for e in log_history if logged & set(e)]
    if not rows:
        return pd.DataFrame(columns=["step", *ADVANTAGE_KEYS])
    df = pd.DataFrame(rows).drop_duplicates("step", keep="last")
    return df.sort_values("step").reset_index(drop=True)


def choose_linthresh(values, quantile: float = 0.1) -> float:
    """Linear range of the symlog axis: the `quantile` of the nonzero |values|, rounded down to a power of 10,
    so the smallest values stay readable while the rest is on a log scale. 1.0 when there is no nonzero value."""
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 1.0
    return float(10.0 ** math.floor(math.log10(np.quantile(v, quantile))))


# ============================================================================================ drawing

def _panels(n: int, width_scale: float = 1.0):
    fig = Figure(figsize=(PANEL_SIZE[0] * n * width_scale, PANEL_SIZE[1]))
    axes = fig.subplots(1, n, squeeze=False)
    return fig, list(axes[0])


def _symlog_axis(ax, linthresh: float, values) -> None:
    """Symmetric log y axis with a zero line, the linear range shaded and thinned decade ticks."""
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.6)
    ax.axhline(0.0, color="0.3", lw=0.8, zorder=1)
    ax.axhspan(-linthresh, linthresh, color="0.9", zorder=0, lw=0)
    major, minor = symlog_ticks(values, linthresh)
    ax.yaxis.set_major_locator(ticker.FixedLocator(major))
    ax.yaxis.set_minor_locator(ticker.FixedLocator(minor))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_signed_power_label))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="major", axis="y", color="0.85", lw=0.5)


def symlog_ticks(values, linthresh: float, max_per_side: int = 4) -> tuple[list[float], list[float]]:
    """Tick positions of a symlog axis: 0 and signed powers of ten from the linear threshold to one decade past
    the largest |value| on each side. At most `max_per_side` major ticks per sign: when the data span more decades,
    every k-th decade counted from the outermost, leaving out ±linthresh. Every decade is a minor tick."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    low = int(round(math.log10(linthresh)))
    major, minor = [0.0], []
    for sign, side in ((1.0, v[v > 0]), (-1.0, -v[v < 0])):
        # up to the decade just past the data: matplotlib draws only the ticks inside the view
        top = int(math.ceil(math.log10(side.max()))) if side.size and side.max() > linthresh else low
        decades = list(range(low, top + 1))
        stride = math.ceil(len(decades) / max_per_side)
        chosen = decades[::-1][::stride]
        if stride > 1 and len(chosen) > 1 and chosen[-1] == low:
            chosen = chosen[:-1]  # many decades: the band is thin and a ±linthresh label would touch the "0"
        major += [sign * 10.0 ** k for k in chosen]
        minor += [sign * 10.0 ** k for k in range(low, top + 2)]
    return sorted(major), sorted(minor)


def _signed_power_label(y: float, _pos=None) -> str:
    if y == 0:
        return "0"
    exp = int(round(math.log10(abs(y))))
    return f"${'-' if y < 0 else ''}10^{{{exp}}}$"


def _plot_curve(ax, data: pd.DataFrame, label: str, style: tuple[str, str], **kwargs) -> None:
    color, marker = style
    ax.plot(data["step"], data["value"], color=color, marker=marker, ms=5, lw=1.5, label=label, **kwargs)


def _empty_note(ax, curves: list[pd.DataFrame]) -> None:
    if all(c.empty for c in curves):
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")


def _legend(ax, max_cols: int = 5) -> None:
    """Legend rows just above the axes, under the panel title (lifted to make room), so it never covers data.
    Call after `_panel_title`."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncol = min(len(handles), max_cols)
    rows = math.ceil(len(handles) / ncol)
    ax.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, fontsize=8,
              frameon=False, handlelength=1.8, columnspacing=1.2, borderaxespad=0.2)
    ax.set_title(ax.get_title(), fontsize=10, pad=8 + 14 * rows)


def _panel_title(ax, text: str, legend_rows: int = 0) -> None:
    """Panel title; `legend_rows` lifts it like a panel with that many legend rows (aligns side-by-side titles)."""
    ax.set_title(text, fontsize=10, pad=8 + 14 * legend_rows if legend_rows else None)


def _log_axis(ax, values) -> None:
    """Log y axis with at least three labelled ticks: decades when the data span enough of them, else 1-2-5
    multiples in plain numbers, else evenly spaced round numbers (a narrow log axis may otherwise label one tick)."""
    ax.set_yscale("log")
    ax.grid(True, which="major", axis="y", color="0.85", lw=0.5)
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return
    lo, hi = v.min(), v.max()
    for subs in ((1.0,), (1.0, 2.0, 5.0)):
        locator = ticker.LogLocator(base=10, subs=subs, numticks=50)
        ticks = locator.tick_values(lo, hi)
        if ((ticks >= lo) & (ticks <= hi)).sum() >= 3:
            break
    else:
        locator = ticker.MaxNLocator(nbins=5)
    if subs == (1.0,):
        return  # matplotlib's default decades and 10^k labels
    ax.yaxis.set_major_locator(locator)
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _step_axis(ax, steps, label: str = "training step") -> None:
    """x axis of checkpoint steps: a tick at every checkpoint when there are few, else integer ticks."""
    steps = np.unique(np.asarray(steps, dtype=float))
    if 0 < len(steps) <= 8:
        ax.set_xticks(steps, [f"{s:g}" for s in steps])
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _mark_excluded(ax, alignment: pd.DataFrame, exclude_loss_increase: bool) -> None:
    """Keep the x range of all checkpoints and draw the left-out ones as dotted vertical lines."""
    if not exclude_loss_increase:
        return
    steps = alignment["step"].dropna().unique()
    if len(steps):
        pad = 0.04 * max(steps.max() - steps.min(), 1)
        ax.set_xlim(steps.min() - pad, steps.max() + pad)
    for i, s in enumerate(excluded_steps(alignment)):
        ax.axvline(s, color="0.55", ls=":", lw=1.2, zorder=0, label="left out (L rose)" if i == 0 else None)


def _titles(fig, title: str, family: str, *notes: str | None) -> None:
    lines = [f"{family} {title}".strip(), *(n for n in notes if n)]
    fig.suptitle("\n".join(lines), fontsize=11)


def _symlog_note(linthresh: float) -> str:
    return f"G on a symmetric log axis; grey band: linear range |G| < {_power_of_ten(linthresh)}"


def _power_of_ten(x: float) -> str:
    exp = round(math.log10(x))
    return f"$10^{{{exp}}}$" if math.isclose(x, 10.0 ** exp) else f"{x:.1e}"


def _loss_note(alignment: pd.DataFrame, exclude_loss_increase: bool) -> str | None:
    if not exclude_loss_increase:
        return None
    steps = excluded_steps(alignment)
    if not steps:
        listed = "none"
    elif len(steps) <= 6:
        listed = "steps " + ", ".join(map(str, steps)) + " (dotted)"
    else:
        listed = f"{len(steps)} checkpoints (dotted lines)"
    return f"left out, the next update increased L on the G sample (App. A): {listed}"


def _g_axes_labels(ax, alignment: pd.DataFrame) -> None:
    _step_axis(ax, alignment["step"].dropna())
    ax.set_ylabel("gradient alignment G")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_components(alignment: pd.DataFrame, path: Path, *, exclude_loss_increase: bool = False) -> Path:
    """Fig. 1 / 2: three panels of G (filtered, all layers)."""
    panels, extras = component_panels(alignment), extra_components(alignment)
    curves = {c: curve_data(alignment, c, exclude_loss_increase=exclude_loss_increase)
              for _, comps in panels for c in comps}
    linthresh = choose_linthresh(pd.concat([c["value"] for c in curves.values()]))
    fig, axes = _panels(len(panels))
    for ax, (name, comps) in zip(axes, panels):
        _symlog_axis(ax, linthresh, pd.concat([curves[c]["value"] for c in comps]))
        for c in comps:
            _plot_curve(ax, curves[c], c, component_style(c, extras), **({"ls": "--"} if c in extras else {}))
        _mark_excluded(ax, alignment, exclude_loss_increase)
        _empty_note(ax, [curves[c] for c in comps])
        _panel_title(ax, name)
        _g_axes_labels(ax, alignment)
        _legend(ax)
    _titles(fig, "learning dynamics: gradient alignment G (outlier mini-batches excluded)",
            algo_family(alignment), _symlog_note(linthresh), _loss_note(alignment, exclude_loss_increase))
    return _save(fig, path)


def plot_filtering(alignment: pd.DataFrame, path: Path, *, exclude_loss_increase: bool = False) -> Path:
    """Fig. 6: TOT G with and without the IQR outlier filter, and how many mini-batches were filtered."""
    kept = curve_data(alignment, "TOT", exclude_loss_increase=exclude_loss_increase)
    every = curve_data(alignment, "TOT", column="G_unfiltered", exclude_loss_increase=exclude_loss_increase)
    counts = outlier_counts(alignment, exclude_loss_increase=exclude_loss_increase)
    linthresh = choose_linthresh(pd.concat([kept["value"], every["value"]]))
    fig, (ax, bar_ax) = _panels(2)
    _symlog_axis(ax, linthresh, pd.concat([kept["value"], every["value"]]))
    _plot_curve(ax, every, "all mini-batches", ("#8c564b", "x"), ls="--")
    _plot_curve(ax, kept, "IQR outliers excluded", COMPONENT_STYLE["TOT"])
    _mark_excluded(ax, alignment, exclude_loss_increase)
    _empty_note(ax, [kept, every])
    _panel_title(ax, "(a) TOT with / without outlier filtering")
    _g_axes_labels(ax, alignment)
    _legend(ax)

    steps = counts["step"].to_numpy()
    width = 0.6 * (np.diff(steps).min() if len(steps) > 1 else 1.0)
    bar_ax.bar(steps, counts["n_outliers"], width=width, color=OUTLIER_COLOR)
    labelled = len(steps) <= 12  # "outliers / all" above each bar while they fit
    if labelled:
        for s, n, k in zip(steps, counts["n_batches"], counts["n_outliers"]):
            bar_ax.annotate(f"{k}/{n}", (s, k), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    bar_ax.set_ylim(0, max(1, counts["n_outliers"].max() if len(counts) else 1) * 1.25)
    bar_ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    _mark_excluded(bar_ax, alignment, exclude_loss_increase)
    _panel_title(bar_ax, "(b) outlier mini-batches" + (" (label: outliers / all)" if labelled else ""),
                 legend_rows=1)
    _step_axis(bar_ax, alignment["step"].dropna())
    bar_ax.set_ylabel("# outlier mini-batches")
    _titles(fig, "gradient alignment with and without outlier filtering", algo_family(alignment),
            _symlog_note(linthresh), _loss_note(alignment, exclude_loss_increase))
    return _save(fig, path)


def plot_layers(alignment: pd.DataFrame, path: Path, *, exclude_loss_increase: bool = False) -> Path:
    """Fig. 9: TOT G restricted to the parameters of each layer group."""
    curves = {g: curve_data(alignment, "TOT", layer_group=g, exclude_loss_increase=exclude_loss_increase)
              for g in LAYER_STYLE}
    linthresh = choose_linthresh(pd.concat([c["value"] for c in curves.values()]))
    fig, (ax,) = _panels(1, width_scale=1.5)
    _symlog_axis(ax, linthresh, pd.concat([c["value"] for c in curves.values()]))
    for g, data in curves.items():
        _plot_curve(ax, data, g, LAYER_STYLE[g])
    _mark_excluded(ax, alignment, exclude_loss_increase)
    _empty_note(ax, list(curves.values()))
    _panel_title(ax, "TOT, gradient restricted to the parameters of each layer group")
    _g_axes_labels(ax, alignment)
    _legend(ax)
    _titles(fig, "layer-wise learning dynamics", algo_family(alignment), _symlog_note(linthresh),
            _loss_note(alignment, exclude_loss_increase))
    return _save(fig, path)


def plot_grad_norms(minibatches: pd.DataFrame, alignment: pd.DataFrame | None, path: Path) -> Path:
    """Fig. 5 / 7a: strip plot of the per-mini-batch TOT norms; POS / NEG mean norms where they exist."""
    tot = minibatch_norms(minibatches, "TOT")
    pos_neg = {c: mean_norms(alignment, minibatches, c) for c in ("POS", "NEG")}
    has_pos_neg = any(not d.empty for d in pos_neg.values())
    fig, axes = _panels(2 if has_pos_neg else 1, width_scale=1.0 if has_pos_neg else 1.5)

    ax = axes[0]
    steps = np.sort(tot["step"].unique())
    spacing = np.diff(steps).min() if len(steps) > 1 else 1.0
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(tot)) * spacing
    for flag, color, label in ((False, NORMAL_COLOR, "normal"), (True, OUTLIER_COLOR, "IQR outlier")):
        sel = (tot["outlier"] == flag).to_numpy()
        ax.scatter(tot["step"].to_numpy()[sel] + jitter[sel], tot["grad_norm"].to_numpy()[sel], s=14,
                   color=color, alpha=0.7, lw=0, label=f"{label} ({int(sel.sum())} mini-batches)")
    _log_axis(ax, tot["grad_norm"])
    _step_axis(ax, steps)
    ax.set_ylabel("gradient norm of a mini-batch")
    _panel_title(ax, ("(a) " if has_pos_neg else "") + "TOT gradient norm per mini-batch")
    _empty_note(ax, [tot])
    _legend(ax)

    if has_pos_neg:
        ax = axes[1]
        for c, data in pos_neg.items():
            _plot_curve(ax, data, c, COMPONENT_STYLE[c])
        _log_axis(ax, pd.concat([d["value"] for d in pos_neg.values()]))
        _step_axis(ax, steps)
        ax.set_ylabel("mean gradient norm")
        _panel_title(ax, "(b) POS / NEG mean norm (outliers excluded)")
        _legend(ax)
    _titles(fig, "gradient magnitudes (log scale)", algo_family(alignment))
    return _save(fig, path)


def plot_advantages(history: pd.DataFrame, path: Path) -> Path:
    """Fig. 3: mean signed (whitened) advantage of each |A| third per PPO update; dashed: before whitening."""
    fig, (ax,) = _panels(1, width_scale=1.5)
    ax.axhline(0.0, color="0.3", lw=0.8, zorder=1)
    many = len(history) > 40
    for k in ADVANTAGE_KEYS:
        if history[k].isna().all():
            continue
        color, marker = advantage_style(k)
        dashed = " " in k
        ax.plot(history["step"], history[k], color=color, marker=None if many else marker, ms=4, lw=1.0 if dashed
                else 1.3, ls="--" if dashed else "-", label=f"{k} (before whitening)" if dashed else f"{k} |A| third")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("PPO update")
    ax.set_ylabel("mean advantage (signed)")
    ax.grid(True, color="0.9", lw=0.5)
    _panel_title(ax, "tokens ranked by |advantage| into thirds")
    _legend(ax)
    _titles(fig, "average (raw) advantages", "PPO")
    return _save(fig, path)


def target_series(alignment: pd.DataFrame, *, exclude_loss_increase: bool = False) -> dict[str, dict[str, pd.DataFrame]]:
    """{target: {component: step, mean, std (NaN: one run), n}} of G (filtered, all layers) from a table holding
    every target (`load_alignment(all_targets=True)`); a table without targets is D' alone."""
    table = alignment if "target" in alignment else alignment.assign(target="dprime")
    found = table["target"].fillna("dprime").drop_duplicates().tolist()
    order = [t for t in TARGET_TITLES if t in found] + [t for t in found if t not in TARGET_TITLES]
    out = {}
    for target in order:
        rows = table[table["target"].fillna("dprime") == target]
        out[target] = {c: curve_data(rows, c, exclude_loss_increase=exclude_loss_increase)
                       .rename(columns={"value": "mean"}).assign(std=float("nan"), n=1)
                       for c in rows["component"].drop_duplicates()}
    return out


TARGET_TITLES = {"dprime": "D' (the paper's)", "chosen": "training y+ (chosen)", "rejected": "training y- (rejected)",
                 "sft": "SFT model's answers", "unrelated": "unrelated answers"}


def target_grid(series: dict[str, dict[str, pd.DataFrame]], *, title: str, notes: tuple = ()) -> Figure:
    """One row per target, the three panels of Fig. 1 (TOT; POS / NEG and the objective's own terms; TOP / MID /
    BOT) over checkpoints, one shared symlog axis; std bands where `std` is there (several seeds)."""
    extras = list(dict.fromkeys(c for comps in series.values() for c in comps if c not in COMPONENT_STYLE))
    panels = tuple((name, comps + tuple(extras)) if comps == ("POS", "NEG") else (name, comps)
                   for name, comps in COMPONENT_PANELS)
    values = pd.concat([d["mean"] for comps in series.values() for d in comps.values()] or [pd.Series([0.0])])
    linthresh = choose_linthresh(values)
    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1] * len(series) + 0.9))
    axes = fig.subplots(len(series), len(panels), squeeze=False, sharex=True)
    for row, (target, comps) in zip(axes, series.items()):
        for ax, (name, members) in zip(row, panels):
            _symlog_axis(ax, linthresh, values)
            for c in members:
                data = comps.get(c)
                if data is None or data.empty:
                    continue
                color, marker = component_style(c, extras)
                ax.plot(data["step"], data["mean"], color=color, marker=marker, ms=4, lw=1.4, label=c,
                        **({"ls": "--"} if c in extras else {}))
                spread = np.nan_to_num(data["std"].to_numpy(float))
                if spread.any():
                    ax.fill_between(data["step"].to_numpy(float), data["mean"] - spread, data["mean"] + spread,
                                    color=color, alpha=0.15, linewidth=0)
            _empty_note(ax, [comps.get(c, pd.DataFrame()) for c in members])
            _panel_title(ax, f"{TARGET_TITLES.get(target, target)}: {name}")
            _step_axis(ax, pd.concat([d["step"] for d in comps.values()] or [pd.Series([0.0])]))
            ax.set_ylabel("G")
            _legend(ax)
    lines = [title, *notes, _symlog_note(linthresh)]
    fig.suptitle("\n".join(lines), fontsize=11)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.22 * len(lines) + 0.1) / height))  # room for the title lines
    return fig


def plot_targets(alignment: pd.DataFrame, path: Path, *, exclude_loss_increase: bool = False) -> Path:
    """G_by_target.png: every component against every target of one run."""
    fig = target_grid(target_series(alignment, exclude_loss_increase=exclude_loss_increase),
                      title=f"{algo_family(alignment)} G of each component against each target (IQR-filtered, all "
                            "layers)".strip(),
                      notes=("G > 0: the component's update raises the target's log-likelihood (first order)",))
    fig.savefig(path, dpi=DPI)
    return path


# ================================================================================================ entry

def draw_figures(run_dir: Path, *, exclude_loss_increase: bool = False) -> list[Path]:
    """Write every figure whose input exists under `<run_dir>/figures/`; return the written paths."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    alignment, minibatches = load_alignment(run_dir), load_minibatches(run_dir)
    history = load_log_history(run_dir)
    written: list[Path] = []
    if alignment is not None:
        loss_check_table(alignment, exclude_loss_increase).to_csv(out_dir / "loss_check.csv", index=False)
        for name, draw in (("G_components.png", plot_components), ("G_filtering.png", plot_filtering),
                           ("G_layers.png", plot_layers)):
            written.append(draw(alignment, out_dir / name, exclude_loss_increase=exclude_loss_increase))
    every = load_alignment(run_dir, all_targets=True)
    if every is not None and "target" in every and every["target"].nunique() > 1:
        written.append(plot_targets(every, out_dir / "G_by_target.png", exclude_loss_increase=exclude_loss_increase))
    if minibatches is not None:
        written.append(plot_grad_norms(minibatches, alignment, out_dir / "grad_norms.png"))
    if history is not None:
        advantages = advantage_history(history)
        if not advantages.empty:
            written.append(plot_advantages(advantages, out_dir / "ppo_advantages.png"))
    return written
