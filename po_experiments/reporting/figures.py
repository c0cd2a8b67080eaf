"""Figures across checkpoints and runs: win-rate curves (Fig. 4 / 11-19) and Table 1 as bars."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry

COLORS = ("#222222", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def _band(ax, steps, mean, spread, color, label):
    steps, mean, spread = np.asarray(steps), np.asarray(mean, float), np.nan_to_num(np.asarray(spread, float))
    ax.plot(steps, mean, marker="o", ms=3, color=color, label=label)
    ax.fill_between(steps, mean - spread, mean + spread, color=color, alpha=0.15, linewidth=0)


def _axes(ax, title: str):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel("win rate vs SFT (%)")
    ax.axhline(50, color="#999999", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)


def win_rate_figure(curves: dict[str, tuple[list, list, list]], *, title: str) -> Figure:
    """One run: label -> (steps, win rates, standard errors), shaded ± one standard error."""
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.subplots()
    for (label, (steps, rate, se)), color in zip(curves.items(), COLORS):
        _band(ax, steps, rate, se, color, label)
    _axes(ax, title)
    fig.tight_layout()
    return fig


def panels_figure(panels: list[tuple[str, dict[str, tuple[list, list, list]]]], *, title: str) -> Figure:
    """Fig. 4: one panel per (title, method -> (steps, mean, std over seeds)), the baseline first."""
    cols = min(3, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.5 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (panel_title, curves) in zip(axes, panels):
        for (label, (steps, mean, std)), color in zip(curves.items(), COLORS):
            _band(ax, steps, mean, std, color, label)
        _axes(ax, panel_title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    return fig


def table_figure(table, *, title: str) -> Figure:
    """Table 1 as bars: one group per model, one bar per method, error bars one std over seeds."""
    models = list(dict.fromkeys(table["model"]))
    methods = list(dict.fromkeys(table["method"]))
    width = 0.8 / max(1, len(methods))
    fig = Figure(figsize=(max(5.0, 1.2 + 1.6 * len(models) * max(1, len(methods)) * 0.45), 3.8))
    ax = fig.subplots()
    for j, (method, color) in enumerate(zip(methods, COLORS * 4)):
        rows = table[table["method"] == method].set_index("model").reindex(models)
        x = np.arange(len(models)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(x, rows["mean"], width, yerr=np.nan_to_num(rows["std"].to_numpy(float)), color=color, label=method,
               capsize=3, alpha=0.85)
        for xi, m, sd in zip(x, rows["mean"], np.nan_to_num(rows["std"].to_numpy(float))):
            if not math.isnan(m):
                ax.text(xi, m + sd + 1, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(models)), models)
    ax.set_ylabel("final win rate vs SFT (%)")
    ax.axhline(50, color="#999999", lw=0.8, ls=":")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False, ncols=min(3, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
