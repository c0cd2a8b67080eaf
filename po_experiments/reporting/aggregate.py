"""A sweep's run dirs -> Table 1 (the best case of each method, beside the paper's) and the Fig. 4 panels.

Reads only the output contract: each run's `summary.json` (method, model, seed) and `win_rate.csv` (one row per
judge and checkpoint). Writes `table1.csv`, `table1.md`, `table1_<judge>.png`, `cases.csv` (every method and
case, ablations included: mean ± std over seeds), `curves.csv`, `fig4_<model>_<judge>.png` and, where the pool holds
DPO / PPO runs, the paper's claims (`claims.md` / `.csv`, reporting/claims.py).

Table 1 (the paper: "five runs with different random seeds using the best-performing hyperparameters"): each
row's runs are grouped into cases by their method label (which carries the case's parameters), and the case with
the highest mean final win rate over its seeds is shown, per judge and model, with its label and seed count.
cPPO is the best of the top- and the middle-weighted cases together: the paper's Table 1 row is "cPPO" and the
text only calls top "more promising", so the row shows whichever wins here, and its label says which.
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
from .controller import controller_report
from .figures import panels_figure, table_figure
from .methods import PANELS, label_of, table1_row
from .paper_values import TABLE1, TABLE1_SEEDS, paper_value

log = logging.getLogger(__name__)
VARIANT_ORDER = ("baseline", "cdpo", "cppo", "cppo_mid", "hppo", "ablation")  # then the other objectives
MODEL_ORDER = ("tiny", "pythia", "qwen3", "llama3")


def row_of(family: str, variant: str) -> str | None:
    """Table 1's row of a (family, variant): its objective's row from the registry; a plain DPO/PPO run restricted
    to some components (variant == family), an ablation or a no-SFT run is in cases.csv only."""
    if variant == family:
        return None
    return table1_row(family if variant == "baseline" else variant, variant)


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
        summary.setdefault("method", label_of(summary.get("algo")))
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


def method_table(final: pd.DataFrame) -> pd.DataFrame:
    """mean ± std (ddof 1) over seeds of the final win rate, per judge, model and method (each case its own)."""
    dup = final.duplicated(["judge", "model", "method", "seed"], keep=False)
    if dup.any():
        log.warning("several runs share a method, model and seed (counted each): %s",
                    sorted(set(final.loc[dup, "run"])))
    grouped = final.groupby(["judge", "model", "family", "variant", "method"], dropna=False)
    table = grouped.agg(n_seeds=("win_rate", "size"), mean=("win_rate", "mean"), std=("win_rate", "std"),
                        seeds=("seed", lambda s: " ".join(str(x) for x in sorted(s)))).reset_index()
    return _order(table)


def table1(methods: pd.DataFrame) -> pd.DataFrame:
    """Table 1: per judge, model and Table 1 row, the case with the highest mean final win rate (more seeds
    first on a tie), its label (`case`), every case it was chosen from (`cases`) and the paper's value."""
    rows = methods.assign(row=[row_of(f, v) for f, v in zip(methods["family"], methods["variant"])])
    rows = rows.dropna(subset=["row", "mean"])
    chosen = []
    for (judge, model, row), group in rows.groupby(["judge", "model", "row"], sort=False):
        group = group.sort_values(["mean", "n_seeds"], ascending=False)
        best = group.iloc[0]
        if best["n_seeds"] < group["n_seeds"].max():
            log.warning("Table 1 %s / %s / %s: the best case %r has %d seed(s), others have up to %d",
                        judge, model, row, best["method"], best["n_seeds"], group["n_seeds"].max())
        paper = paper_value(row, model)
        chosen.append({"judge": judge, "model": model, "method": row, "case": best["method"],
                       "family": best["family"], "variant": best["variant"], "n_seeds": best["n_seeds"],
                       "mean": best["mean"], "std": best["std"], "seeds": best["seeds"], "n_cases": len(group),
                       "cases": "; ".join(f"{m}: {x:.2f} (n={n})" for m, x, n in
                                          zip(group["method"], group["mean"], group["n_seeds"])),
                       "paper_mean": paper[0] if paper else None, "paper_std": paper[1] if paper else None})
    columns = ["judge", "model", "method", "case", "family", "variant", "n_seeds", "mean", "std", "seeds", "n_cases",
               "cases", "paper_mean", "paper_std"]
    table = pd.DataFrame(chosen, columns=columns)
    order = {"method": {r: i for i, r in enumerate(TABLE1)}, "model": {m: i for i, m in enumerate(MODEL_ORDER)}}
    return table.sort_values(["judge", "method", "model"], key=lambda s: s.map(order[s.name]).fillna(99)
                             if s.name in order else s, kind="stable").reset_index(drop=True)  # paper rows first


def curves(rates: pd.DataFrame) -> pd.DataFrame:
    """mean and std over seeds of the win rate at each checkpoint, per judge, model and method."""
    grouped = rates.groupby(["judge", "model", "family", "variant", "method", "step"], dropna=False)["win_rate"]
    return _order(grouped.agg(mean="mean", std="std", n="size").reset_index())


def cell(mean: float, std: float, n: int) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 and not math.isnan(std) else f"{mean:.1f} (1 seed)"


def paper_cell(row: str, model: str) -> str:
    value = paper_value(row, model)
    return "—" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def table1_cells(rows: pd.DataFrame, models: list[str]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Table 1's rows of one judge: (row, per model (ours, its case, the paper's)); "—" where a model has none."""
    out = []
    for method, m in rows.groupby("method", sort=False):
        by_model = m.set_index("model")
        cells = []
        for x in models:
            r = by_model.loc[x] if x in by_model.index else None
            ours = "—" if r is None else cell(r["mean"], r["std"], r["n_seeds"])
            case = "" if r is None else f"{r['case']}, {r['n_seeds']} seed(s), best of {r['n_cases']}"
            cells.append((ours, case, paper_cell(method, x)))
        out.append((method, cells))
    return out


def table1_markdown(table: pd.DataFrame) -> str:
    """Table 1 per judge: the rows as the paper's, an "ours" (best case; its label and seeds) and a "paper"
    column per model; a model's columns appear only where its runs were supplied."""
    parts = []
    for judge, rows in table.groupby("judge", sort=False):
        models = sorted(dict.fromkeys(rows["model"]), key=lambda m: MODEL_ORDER.index(m) if m in MODEL_ORDER else 99)
        parts.append(f"### Table 1: final win rate vs SFT (%), judge: {judge}\n")
        parts.append(f"ours: mean ± std over seeds of each row's best case (its label and seeds below the value); "
                     f"paper: its Table 1 ({TABLE1_SEEDS} seeds, its best hyper-parameters, an unnamed judge).\n")
        parts.append("| Method | " + " | ".join(f"{m} ours | {m} paper" for m in models) + " |")
        parts.append("|---|" + "---:|---:|" * len(models))
        for method, cells in table1_cells(rows, models):
            parts.append(f"| {method} | " + " | ".join(f"{ours}<br>{case} | {paper}" if case else f"{ours} | {paper}"
                                                       for ours, case, paper in cells) + " |")
        parts.append("")
    return "\n".join(parts)


def markdown(table: pd.DataFrame) -> str:
    """Every method and case per judge: methods as rows, models as columns, "mean ± std" over seeds."""
    parts = []
    for judge, rows in table.groupby("judge", sort=False):
        models = list(dict.fromkeys(rows["model"]))
        seeds = sorted(set(rows["n_seeds"]))
        parts.append(f"### Every case: win rate vs SFT (%), judge: {judge}; mean ± std over "
                     f"{'/'.join(map(str, seeds))} seeds\n")
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
    methods, curve = method_table(final_rates(rates)), curves(rates)
    table = table1(methods)
    out.mkdir(parents=True, exist_ok=True)
    written = {name: out / name for name in ("table1.csv", "table1.md", "cases.csv", "curves.csv")}
    table.to_csv(written["table1.csv"], index=False, float_format="%.3f")
    methods.to_csv(written["cases.csv"], index=False, float_format="%.3f")
    written["table1.md"].write_text(table1_markdown(table) + "\n" + markdown(methods))
    curve.to_csv(written["curves.csv"], index=False, float_format="%.3f")
    for judge, rows in table.groupby("judge", sort=False):
        path = out / f"table1_{judge}.png"
        table_figure(rows, title=f"Table 1: final win rate vs SFT (judge: {judge})").savefig(
            path, dpi=110, bbox_inches="tight")
        written[path.name] = path
    for judge, rows in methods.groupby("judge", sort=False):
        for model in dict.fromkeys(rows["model"]):
            path = out / f"fig4_{model}_{judge}.png"
            fig = panels_figure(panels(curve, judge, model), title=f"{model}: win rate over training\n"
                                                                   f"(mean ± std over seeds; judge: {judge})")
            fig.savefig(path, dpi=110, bbox_inches="tight")
            written[path.name] = path
    from .claims import write_claims  # here: claims reads this module's runs (a top-level import would be circular)
    written.update(write_claims(root, out))  # claims.md / .csv where the pool has DPO / PPO runs
    from .targets import draw_targets  # G against several targets (targets.py): its figures and tables
    written.update(draw_targets(root, out))
    written.update(controller_report(training_runs(runs), final_rates(rates), out))  # controller runs present
    return written
