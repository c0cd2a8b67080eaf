"""The closed-loop controller against DPO and the hand-tuned cDPO cases (experiment=controller; controllers/).

`controller_report(runs, rates, out)` writes, when the runs include a controller run:
  controller.csv / controller.md  per judge and model: DPO, every cDPO case and every controller run's method, the
                                   final win rate mean ± std over seeds, the mean wall time, the controller's own
                                   overhead (controller_overhead of summary.json: its seconds / training seconds)
                                   and the wall time against the cDPO runs of the same seed (mean over their cases);
  controller_lambda_<model>.png   lambda over training (mean ± std over seeds of controller.csv) beside the cDPO
                                   cases' t1/t2 schedules.
`run_figure(frame)` is one run's figures/controller.png (lambda and the two measured G at each estimate).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..objectives.pairwise import schedule_lambda
from .figures import COLORS

COLUMNS = ["judge", "model", "method", "variant", "n_seeds", "mean", "std", "seeds", "wall_time_s",
           "controller_overhead", "wall_vs_cdpo"]


def run_figure(frame: pd.DataFrame, title: str) -> Figure:
    """lambda (left) and G_POS / G_NEG (right, symlog) at each estimate of one run."""
    fig = Figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    left.step(frame["step"], frame["lambda"], where="post", color=COLORS[1], label="lambda (after the estimate)")
    left.set_ylim(-0.05, 1.05)
    left.set_xlabel("training step")
    left.set_ylabel("lambda (weight of negative learning)")
    measured = [c for c in frame.columns if c.startswith("G_")]  # G_POS, G_NEG (hPPO too); cPPO: G_REST, G_TOP
    for column, color in zip(measured, (COLORS[3], COLORS[2])):
        right.plot(frame["step"], frame[column], marker="o", ms=3, color=color, label=column)
    right.axhline(0, color="#999999", lw=0.8, ls=":")
    right.set_yscale("symlog", linthresh=max(float(frame[measured].abs().median().median()) / 10, 1e-12))
    right.set_xlabel("training step")
    right.set_ylabel("G on the proxy (current model's answers)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def is_controller_run(summary: dict) -> bool:
    return summary.get("controller") not in (None, "none")


def _compared(summary: dict) -> bool:
    """DPO, the cDPO cases and controller runs (of the pairwise family)."""
    return summary.get("family") == "dpo" and (summary.get("variant") in ("baseline", "cdpo")
                                               or is_controller_run(summary))


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def controller_table(runs: list, final: pd.DataFrame) -> pd.DataFrame:
    """One row per judge, model and method among DPO, cDPO cases and controller runs (see the module doc)."""
    by_dir = {str(r.dir): r.summary for r in runs}
    final = final[[_compared(by_dir.get(run, {})) for run in final["run"]]]
    if final.empty:
        return pd.DataFrame(columns=COLUMNS)
    cdpo_wall = {}  # (model, seed) -> wall times of the cDPO cases
    for r in runs:
        if r.summary.get("variant") == "cdpo" and r.summary.get("wall_time_s"):
            cdpo_wall.setdefault((r.summary["model"], r.summary["seed"]), []).append(r.summary["wall_time_s"])
    rows = []
    for (judge, model, method), group in final.groupby(["judge", "model", "method"], sort=False):
        summaries = [by_dir[run] for run in group["run"]]
        walls = [s.get("wall_time_s") for s in summaries]
        vs = [s["wall_time_s"] / _mean(cdpo_wall[(model, s["seed"])]) - 1 for s in summaries
              if is_controller_run(s) and s.get("wall_time_s") and (model, s["seed"]) in cdpo_wall]
        rows.append({"judge": judge, "model": model, "method": method, "variant": group["variant"].iloc[0],
                     "n_seeds": len(group), "mean": group["win_rate"].mean(), "std": group["win_rate"].std(),
                     "seeds": " ".join(str(x) for x in sorted(group["seed"])), "wall_time_s": _mean(walls),
                     "controller_overhead": _mean([s.get("controller_overhead") for s in summaries]),
                     "wall_vs_cdpo": _mean(vs)})
    order = {"baseline": 0, "cdpo": 1}
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["judge", "model", "variant", "method"],
                             key=lambda s: s.map(lambda v: order.get(v, 2)) if s.name == "variant" else s,
                             kind="stable").reset_index(drop=True)


def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:+.1f} %"


def table_cells(row) -> list[str]:
    spread = f"{row['mean']:.1f} ± {row['std']:.1f}" if row["n_seeds"] > 1 else f"{row['mean']:.1f} (1 seed)"
    overhead = row["controller_overhead"]
    return [row["method"], f"{spread} (n={row['n_seeds']})", f"{row['wall_time_s']:.0f} s",
            "—" if isinstance(overhead, float) and math.isnan(overhead) else f"{100 * overhead:.1f} %",
            _pct(row["wall_vs_cdpo"])]


HEADERS = ["Method", "final win rate vs SFT (%)", "wall time", "controller overhead (of training)",
           "wall time vs cDPO (same seed)"]


def markdown(table: pd.DataFrame) -> str:
    parts = []
    for (judge, model), rows in table.groupby(["judge", "model"], sort=False):
        parts.append(f"### Closed-loop controller vs DPO and the cDPO cases: {model}, judge {judge}\n")
        parts.append("mean ± std over seeds; controller overhead: the controller's seconds / the training's "
                     "(summary.json controller_overhead); wall time vs cDPO: the whole run's, against the mean of "
                     "the cDPO cases of the same seed.\n")
        parts.append("| " + " | ".join(HEADERS) + " |")
        parts.append("|---|" + "---:|" * (len(HEADERS) - 1))
        parts += ["| " + " | ".join(table_cells(row)) + " |" for _, row in rows.iterrows()]
        parts.append("")
    return "\n".join(parts)


def html_table(table: pd.DataFrame) -> str:
    """The table for the HTML report (reporting/html.py)."""
    import html

    parts = []
    for (judge, model), rows in table.groupby(["judge", "model"], sort=False):
        parts.append(f"<h3>{html.escape(str(model))}, judge: {html.escape(str(judge))}</h3><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS) + "</tr>")
        for _, row in rows.iterrows():
            cells = table_cells(row)
            parts.append(f"<tr><td>{html.escape(cells[0])}</td>"
                         + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells[1:]) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def lambda_curves(runs: list) -> pd.DataFrame:
    """Per model, method and step: mean and std over seeds of the controller's lambda (controller.csv)."""
    frames = []
    for r in runs:
        path = Path(r.dir) / "controller.csv"
        if is_controller_run(r.summary) and path.exists():
            frame = pd.read_csv(path)
            frames.append(frame.assign(model=r.summary["model"], method=r.summary["method"], seed=r.summary["seed"]))
    if not frames:
        return pd.DataFrame(columns=["model", "method", "step", "mean", "std", "n"])
    every = pd.concat(frames, ignore_index=True)
    return every.groupby(["model", "method", "step"])["lambda"].agg(mean="mean", std="std", n="size").reset_index()


def lambda_figure(curves: pd.DataFrame, cases: dict[str, tuple[int, int, int]], *, title: str) -> Figure:
    """The controllers' lambda (mean ± std over seeds) and the cDPO cases' schedules (label -> t1, t2, last step)."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for (method, rows), color in zip(curves.groupby("method", sort=False), COLORS[1:]):
        steps, mean, std = rows["step"].to_numpy(), rows["mean"].to_numpy(), np.nan_to_num(rows["std"].to_numpy())
        ax.step(steps, mean, where="post", color=color, label=f"{method} (n={int(rows['n'].max())})")
        ax.fill_between(steps, mean - std, mean + std, step="post", color=color, alpha=0.15, linewidth=0)
    for (label, (t1, t2, last)), ls in zip(cases.items(), ("--", "-.", ":", (0, (5, 1)))):
        steps = np.arange(0, last + 1)
        ax.plot(steps, [schedule_lambda(s, t1, t2) for s in steps], color="#555555", ls=ls, lw=1, label=label)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("lambda (weight of negative learning)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def cdpo_schedules(runs: list, model: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for r in runs:
        s = r.summary
        params = s.get("algo_params") or {}
        if s.get("model") == model and s.get("variant") == "cdpo" and "t1" in params and "t2" in params:
            out[s["method"]] = (int(params["t1"]), int(params["t2"]), int(s.get("final_step") or params["t2"]))
    return dict(sorted(out.items()))


def controller_report(runs: list, final: pd.DataFrame, out: Path) -> dict[str, Path]:
    """controller.csv / .md and the lambda figures, when `runs` include a controller run (else nothing)."""
    if not any(is_controller_run(r.summary) for r in runs):
        return {}
    table = controller_table(runs, final)
    written = {"controller.csv": out / "controller.csv", "controller.md": out / "controller.md"}
    table.to_csv(written["controller.csv"], index=False, float_format="%.4f")
    written["controller.md"].write_text(markdown(table))
    curves = lambda_curves(runs)
    for model, rows in curves.groupby("model", sort=False):
        path = out / f"controller_lambda_{model}.png"
        lambda_figure(rows, cdpo_schedules(runs, model), title=f"{model}: lambda over training (controller: "
                      "mean ± std over seeds; cDPO cases: their t1/t2 schedule)").savefig(path, dpi=110,
                                                                                        bbox_inches="tight")
        written[path.name] = path
    return written
