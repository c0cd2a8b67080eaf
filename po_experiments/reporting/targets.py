"""G against several targets across a sweep (beyond the paper): what each component does to each likelihood.

Reads each run's alignment.csv with every target (`analysis.targets`: dprime = D', chosen / rejected = the G sample's
training y+ / y-, sft = the SFT model's answers to the D' questions, unrelated = another question's SFT answer),
its `target_logp` column (the target's mean log-likelihood under theta_t) and, where written, attribution.csv and
examples.json. Writes:

- `G_by_target_<model>.png` / `.csv`: per family (DPO, PPO), G (IQR-filtered, all layers) of every component against
  every target over checkpoints, mean ± std over the seeds of the plain runs (variant baseline);
- `targets_correlation.csv`: the first-order check. G_c(t) = g'_t . grad L_c predicts the change of target t's mean
  log-likelihood under an update along -grad L_c: +lr G (Eq. 1-3). Between consecutive checkpoints s < s' the
  prediction is G_TOT(t, s) x (s' - s) (unfiltered: the mean gradient the optimizer follows; the learning rate and
  Adam's scaling are one unknown positive factor, which Pearson's r ignores) and the measured change is
  target_logp(s') - target_logp(s). Per run and pooled over runs of a model and family: r, n points
  (checkpoints x targets), and the share of points where the signs agree;
- `attribution.md`: per run, component and target, the 3 examples pushing the target's log-likelihood most up and
  most down (their mean contribution over the checkpoints outside outlier mini-batches; PPO: one response of one
  checkpoint each), with their text, truncated.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import plots
from ..analysis.tables import PAPER_TARGET

log = logging.getLogger(__name__)
TOP_K = 3
TEXT_CHARS = 160


def load_all_targets(run_dir: Path) -> pd.DataFrame | None:
    """A run's G table with every target (D' alone for a table written before targets)."""
    table = plots.load_alignment(run_dir, all_targets=True)
    if table is None or table.empty:
        return None
    return table if "target" in table else table.assign(target=PAPER_TARGET)


# ============================================================================================ first order


def first_order_points(table: pd.DataFrame, component: str = "TOT") -> pd.DataFrame:
    """Per target and pair of consecutive checkpoints s < s': predicted = G_unfiltered(component, all layers, s)
    x (s' - s), measured = target_logp(s') - target_logp(s). Columns target, step, next_step, G, predicted,
    measured. Empty without a target_logp column."""
    if "target_logp" not in table:
        return pd.DataFrame(columns=["target", "step", "next_step", "G", "predicted", "measured"])
    rows = table[(table["component"] == component) & (table["layer_group"] == "all")]
    out = []
    for target, group in rows.groupby(rows["target"].fillna(PAPER_TARGET), sort=False):
        group = group.sort_values("step")
        steps, g, logp = (group[c].to_numpy(float) for c in ("step", "G_unfiltered", "target_logp"))
        for i in range(len(steps) - 1):
            out.append({"target": target, "step": int(steps[i]), "next_step": int(steps[i + 1]), "G": g[i],
                        "predicted": g[i] * (steps[i + 1] - steps[i]), "measured": logp[i + 1] - logp[i]})
    return pd.DataFrame(out, columns=["target", "step", "next_step", "G", "predicted", "measured"])


def pearson(x, y) -> float:
    """Pearson's r of two series (NaN where fewer than 3 finite points or no spread)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def correlation_row(points: pd.DataFrame, **keys) -> dict:
    ok = points[np.isfinite(points["predicted"]) & np.isfinite(points["measured"])]
    agree = (np.sign(ok["predicted"]) == np.sign(ok["measured"])).mean() if len(ok) else math.nan
    return {**keys, "pearson_r": pearson(ok["predicted"], ok["measured"]), "n_points": len(ok),
            "n_targets": ok["target"].nunique(), "sign_agreement": agree}


def correlation_table(runs: list[tuple[dict, pd.DataFrame]]) -> pd.DataFrame:
    """Per run and pooled per (model, family): r of predicted vs measured over checkpoints x targets."""
    rows, pooled = [], {}
    for summary, table in runs:
        points = first_order_points(table)
        key = (summary.get("model"), summary.get("family"))
        pooled.setdefault(key, []).append(points)
        rows.append(correlation_row(points, scope="run", model=key[0], family=key[1], method=summary.get("method"),
                                    seed=summary.get("seed"), run=summary.get("run")))
    for (model, family), frames in pooled.items():
        rows.append(correlation_row(pd.concat(frames, ignore_index=True), scope="pooled", model=model, family=family,
                                    method="all", seed=None, run=f"{len(frames)} runs"))
    return pd.DataFrame(rows)


# ============================================================================================ G by target


def mean_by_target(tables: list[pd.DataFrame]) -> dict[str, dict[str, pd.DataFrame]]:
    """{target: {component: step, mean, std (ddof 1), n}} over runs (seeds) of G (filtered, all layers)."""
    per_run = [plots.target_series(t) for t in tables]
    targets = list(dict.fromkeys(t for s in per_run for t in s))
    out = {}
    for target in targets:
        comps = list(dict.fromkeys(c for s in per_run for c in s.get(target, {})))
        out[target] = {}
        for c in comps:
            frames = [s[target][c][["step", "mean"]] for s in per_run if c in s.get(target, {})]
            data = pd.concat(frames, ignore_index=True)
            out[target][c] = data.groupby("step")["mean"].agg(["mean", "std", "size"]).rename(
                columns={"size": "n"}).reset_index()
    return out


def series_table(model: str, family: str, series: dict) -> pd.DataFrame:
    records = [{"model": model, "family": family, "target": t, "component": c, **rec}
               for t, comps in series.items() for c, data in comps.items() for rec in data.to_dict("records")]
    return pd.DataFrame(records, columns=["model", "family", "target", "component", "step", "mean", "std", "n"])


# ============================================================================================ attribution


def _text(value) -> str:
    """An example's text on one line, truncated (message lists: their contents joined)."""
    if isinstance(value, list):
        value = " | ".join(str(m.get("content", m)) if isinstance(m, dict) else str(m) for m in value)
    text = " ".join(str(value).split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"


def example_text(examples: dict, step: int, index: int) -> str:
    if examples.get("family") == "ppo":
        rows = examples.get("steps", {}).get(str(step), [])
        e = rows[index] if index < len(rows) else {}
        return (f"prompt: {_text(e.get('prompt', '?'))}<br>response: {_text(e.get('response', '?'))}"
                f"<br>advantage {e.get('advantage', math.nan):.3g}, score {e.get('score', math.nan):.3g}")
    rows = examples.get("examples", [])
    e = rows[index] if index < len(rows) else {}
    return (f"prompt: {_text(e.get('prompt', '?'))}<br>y+: {_text(e.get('chosen', '?'))}"
            f"<br>y-: {_text(e.get('rejected', '?'))}")


def ranked_examples(attribution: pd.DataFrame, family: str) -> pd.DataFrame:
    """Per component and target, every example's contribution outside outlier mini-batches: DPO the mean over
    checkpoints (the same pairs at every checkpoint), PPO each (step, response) alone."""
    kept = attribution[~plots._as_bool(attribution["outlier_batch"])]
    if family == "ppo":
        return kept[["component", "target", "step", "example", "contribution"]]
    mean = kept.groupby(["component", "target", "example"], sort=False)["contribution"].mean().reset_index()
    return mean.assign(step=-1)


def attribution_markdown(run_name: str, attribution: pd.DataFrame, examples: dict, family: str) -> str:
    ranked = ranked_examples(attribution, family)
    what = "mean over checkpoints" if family != "ppo" else "one response of one checkpoint each"
    parts = [f"## {run_name}\n", f"Top {TOP_K} examples per component and target ({what}; contribution to G, "
                                 "outlier mini-batches left out). Up: raise the target's log-likelihood.\n",
             "| component | target | direction | contribution | step | example | text |", "|---|---|---|---:|---:|---:|---|"]
    order = {c: i for i, c in enumerate((*plots.COMPONENT_STYLE, *plots.TARGET_TITLES))}
    keys = sorted(ranked.groupby(["component", "target"]).groups, key=lambda k: (order.get(k[0], 99), k[0],
                                                                                  order.get(k[1], 99), k[1]))
    groups = dict(list(ranked.groupby(["component", "target"])))
    for component, target in keys:
        group = groups[(component, target)]
        ordered = group.sort_values("contribution")
        for direction, chosen in (("up", ordered.iloc[::-1][:TOP_K]), ("down", ordered[:TOP_K])):
            chosen = chosen[chosen["contribution"] > 0] if direction == "up" else chosen[chosen["contribution"] < 0]
            for r in chosen.itertuples():
                step = "all" if r.step < 0 else str(r.step)
                text = example_text(examples, int(r.step), int(r.example)).replace("|", "\\|")
                parts.append(f"| {component} | {target} | {direction} | {r.contribution:.3g} | {step} | {r.example} | "
                             f"{text} |")
    return "\n".join(parts) + "\n"


# ============================================================================================ entry


def draw_targets(root: Path, out: Path) -> dict[str, Path]:
    """The targets' figures and tables of the runs under `root` ({} when no run has G against several targets)."""
    from .aggregate import find_runs

    runs = []
    for run in find_runs(root):
        table = load_all_targets(run.dir)
        if table is not None and table["target"].nunique() > 1:
            runs.append((run, table))
    if not runs:
        log.info("targets: no run with G against several targets under %s", root)
        return {}
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    corr = correlation_table([({**r.summary, "run": str(r.dir)}, t) for r, t in runs])
    path = out / "targets_correlation.csv"
    corr.to_csv(path, index=False, float_format="%.6g")
    written[path.name] = path
    for model in dict.fromkeys(r.summary["model"] for r, _ in runs):
        frames, fig_series = [], {}
        for family in ("dpo", "ppo"):
            chosen = [t for r, t in runs if (r.summary["model"], r.summary["family"]) == (model, family)
                      and r.summary.get("variant") == "baseline"]
            if not chosen:
                continue
            series = mean_by_target(chosen)
            frames.append(series_table(model, family, series))
            fig_series[family] = (series, len(chosen))
        if not frames:
            continue
        csv = out / f"G_by_target_{model}.csv"
        pd.concat(frames, ignore_index=True).to_csv(csv, index=False, float_format="%.10g")
        written[csv.name] = csv
        for family, (series, n) in fig_series.items():
            name = f"G_by_target_{model}.png" if len(fig_series) == 1 else f"G_by_target_{model}_{family}.png"
            fig = plots.target_grid(series, title=f"{model} {family.upper()}: G of each component against each "
                                                  f"target ({n} run{'s' if n > 1 else ''}, mean ± std over seeds)")
            fig.savefig(out / name, dpi=100, bbox_inches="tight")
            written[name] = out / name
    sections = []
    for run, _ in runs:
        attribution = run.dir / "attribution.csv"
        if not attribution.exists():
            continue
        examples_path = run.dir / "examples.json"
        examples = json.loads(examples_path.read_text()) if examples_path.exists() else {}
        name = str(run.dir.relative_to(root)) if run.dir.is_relative_to(root) else run.dir.name
        sections.append(attribution_markdown(f"{run.summary.get('method')} · {run.summary.get('model')} · seed "
                                             f"{run.summary.get('seed')} ({name})", pd.read_csv(attribution),
                                             examples, run.summary.get("family", "dpo")))
    if sections:
        path = out / "attribution.md"
        path.write_text("# Per-example attribution of G\n\n" + "\n".join(sections))
        written[path.name] = path
    return written
