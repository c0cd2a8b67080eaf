"""A sweep's run dirs -> Table 1 (mean ± std over seeds per method and model) and the Fig. 4 panels.

Reads only the output contract: each run's `summary.json` (method, model, seed) and `win_rate.csv` (one row per
judge and checkpoint). Writes `table1.csv`, `table1.md`, `table1_<judge>.png`, `curves.csv` and
`fig4_<model>_<judge>.png` into the output folder.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from ..config import _run_name
from .figures import panels_figure, table_figure
from .methods import LABELS, PANELS

log = logging.getLogger(__name__)
VARIANT_ORDER = ("baseline", "cdpo", "cppo", "cppo_mid", "hppo", "ablation")
MODEL_ORDER = ("tiny", "pythia", "qwen3", "llama3")


@dataclass
class Run:
    dir: Path
    summary: dict
    win_rates: pd.DataFrame  # win_rate.csv: judge, step, win_rate, win_rate_se, ...


def find_runs(root: Path) -> list[Run]:
    """Every finished run (a summary.json) under `root`, e.g. outputs/<name>/ or a multirun folder."""
    runs = []
    for path in sorted(Path(root).rglob("summary.json")):
        if {"wandb", "eval", "checkpoints"} & set(path.relative_to(root).parts):
            continue
        summary = json.loads(path.read_text())
        summary.setdefault("method", LABELS.get(summary.get("algo"), summary.get("algo")))
        summary.setdefault("family", "ppo" if "ppo" in str(summary.get("algo")) else "dpo")
        summary.setdefault("variant", "baseline" if summary.get("algo") in ("dpo", "ppo") else summary.get("algo"))
        table = path.parent / "win_rate.csv"
        runs.append(Run(path.parent, summary, pd.read_csv(table) if table.exists() else pd.DataFrame()))
    return runs


def training_runs(runs: list[Run]) -> list[Run]:
    """The runs that count for win rates: each trained model once. Analysis settings no longer name a run dir
    (config.NOT_IDENTITY), but a pool may hold dirs named before, e.g. Fig. 7's `analysis.dprime=train,...` runs,
    which trained exactly what their twin trained: a dir whose name holds such a setting is left out when the dir
    its training settings name is in the pool too."""
    present = {(r.dir.parent, r.dir.name) for r in runs}
    kept = [r for r in runs if (name := identity_name(r.dir)) == r.dir.name or (r.dir.parent, name) not in present]
    if len(kept) < len(runs):
        log.info("%d run dir(s) named by analysis / eval settings (before they stopped naming runs) left out of win "
                 "rates: their twins trained the same models", len(runs) - len(kept))
    return kept


def identity_name(run_dir: Path) -> str:
    """The name the run dir's overrides (.hydra/overrides.yaml) get today; its own name when it has none."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return run_dir.name
    overrides = OmegaConf.load(path)
    return _run_name(list(overrides)) if overrides else run_dir.name


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    key = {"family": lambda s: s.map({"dpo": 0, "ppo": 1}).fillna(2),
           "variant": lambda s: s.map({v: i for i, v in enumerate(VARIANT_ORDER)}).fillna(len(VARIANT_ORDER)),
           "model": lambda s: s.map({m: i for i, m in enumerate(MODEL_ORDER)}).fillna(len(MODEL_ORDER))}
    cols = [c for c in ("judge", "model", "family", "variant", "method", "step") if c in frame]
    return frame.sort_values(cols, key=lambda s: key[s.name](s) if s.name in key else s).reset_index(drop=True)


def checkpoint_rates(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, judge, step), with the run's method, model and seed."""
    frames = []
    for run in runs:
        if run.win_rates.empty:
            log.warning("%s has no win_rate.csv rows (eval.judge=none?): left out", run.dir)
            continue
        s = run.summary
        frames.append(run.win_rates.assign(run=str(run.dir), model=s["model"], method=s["method"], seed=s["seed"],
                                           family=s["family"], variant=s["variant"]))
    if not frames:
        raise ValueError("no run with a win rate was found")
    return pd.concat(frames, ignore_index=True)


def final_rates(rates: pd.DataFrame) -> pd.DataFrame:
    """Each run's last checkpoint per judge (the final model)."""
    return rates.loc[rates.groupby(["run", "judge"])["step"].idxmax()].reset_index(drop=True)


def table1(final: pd.DataFrame) -> pd.DataFrame:
    """mean ± std (ddof 1) over seeds of the final win rate, per judge, model and method."""
    dup = final.duplicated(["judge", "model", "method", "seed"], keep=False)
    if dup.any():
        log.warning("several runs share a method, model and seed (counted each): %s",
                    sorted(set(final.loc[dup, "run"])))
    grouped = final.groupby(["judge", "model", "family", "variant", "method"], dropna=False)
    table = grouped.agg(n_seeds=("win_rate", "size"), mean=("win_rate", "mean"), std=("win_rate", "std"),
                        seeds=("seed", lambda s: " ".join(str(x) for x in sorted(s)))).reset_index()
    return _order(table)


def curves(rates: pd.DataFrame) -> pd.DataFrame:
    """mean and std over seeds of the win rate at each checkpoint, per judge, model and method."""
    grouped = rates.groupby(["judge", "model", "family", "variant", "method", "step"], dropna=False)["win_rate"]
    return _order(grouped.agg(mean="mean", std="std", n="size").reset_index())


def cell(mean: float, std: float, n: int) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 and not math.isnan(std) else f"{mean:.1f} (1 seed)"


def markdown(table: pd.DataFrame) -> str:
    """Table 1 per judge: methods as rows, models as columns, "mean ± std" over seeds."""
    parts = []
    for judge, rows in table.groupby("judge", sort=False):
        models = list(dict.fromkeys(rows["model"]))
        seeds = sorted(set(rows["n_seeds"]))
        parts.append(f"### Win rate vs SFT (%), judge: {judge}; mean ± std over {'/'.join(map(str, seeds))} seeds\n")
        parts.append("| Method | " + " | ".join(models) + " |")
        parts.append("|---|" + "---:|" * len(models))
        for method, m in rows.groupby("method", sort=False):
            by_model = m.set_index("model")
            cells = [cell(by_model.at[x, "mean"], by_model.at[x, "std"], by_model.at[x, "n_seeds"])
                     if x in by_model.index else "—" for x in models]
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def panels(curve: pd.DataFrame, judge: str, model: str) -> list[tuple[str, dict]]:
    """Fig. 4's panels that this sweep has runs for: the family's plain run against each variant."""
    rows = curve[(curve["judge"] == judge) & (curve["model"] == model)]
    found = []
    for letter, title, family, variant in PANELS:
        members = rows[(rows["family"] == family) & rows["variant"].isin(["baseline", variant])]
        if variant not in set(members["variant"]):
            continue
        drawn = {m: (r["step"].tolist(), r["mean"].tolist(), r["std"].tolist())
                 for m, r in members.groupby("method", sort=False)}
        found.append((f"({letter}) {title}", drawn))
    if not found:  # no ablation/variant pair: still show every method's curve
        found.append(("win rate over training", {m: (r["step"].tolist(), r["mean"].tolist(), r["std"].tolist())
                                                 for m, r in rows.groupby("method", sort=False)}))
    return found


def aggregate(root: Path, out: Path) -> dict[str, Path]:
    runs = find_runs(root)
    log.info("%d finished runs under %s", len(runs), root)
    rates = checkpoint_rates(training_runs(runs))
    table, curve = table1(final_rates(rates)), curves(rates)
    out.mkdir(parents=True, exist_ok=True)
    written = {"table1.csv": out / "table1.csv", "table1.md": out / "table1.md", "curves.csv": out / "curves.csv"}
    table.to_csv(written["table1.csv"], index=False, float_format="%.3f")
    written["table1.md"].write_text(markdown(table))
    curve.to_csv(written["curves.csv"], index=False, float_format="%.3f")
    for judge, rows in table.groupby("judge", sort=False):
        path = out / f"table1_{judge}.png"
        table_figure(rows, title=f"Table 1: final win rate vs SFT (judge: {judge})").savefig(
            path, dpi=110, bbox_inches="tight")
        written[path.name] = path
        for model in dict.fromkeys(rows["model"]):
            path = out / f"fig4_{model}_{judge}.png"
            fig = panels_figure(panels(curve, judge, model), title=f"{model}: win rate over training\n"
                                                                   f"(mean ± std over seeds; judge: {judge})")
            fig.savefig(path, dpi=110, bbox_inches="tight")
            written[path.name] = path
    return written
