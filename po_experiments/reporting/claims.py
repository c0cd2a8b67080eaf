"""The paper's qualitative claims as a tracked table (`experiment=claims`): `claims.md` / `claims.csv`, one row per
claim and model, with the paper's statement (section, figure), the measured value(s), the rule that decides it and
its verdict: held / not held / not measurable (the runs it needs are missing, or hold too few checkpoints).

Reads only the output contract (as the figures): each run's summary.json and win_rate.csv, its G table against the
paper's D' (alignment.csv through `analysis.tables.paper_target`, held-out D', all layers, the `G` column: IQR
filtered; App. A's left-out checkpoints excluded where the run has the filter on, as in Fig. 1 / 2) and its logged
advantages (Fig. 3). G comes from the plain DPO / PPO runs of the default parameters that the G figures draw
(`paper_figures.select`); win rates from each trained model once (`aggregate.training_runs`), the final checkpoint,
judged by the judge most of the model's runs name. The output is sorted and printed with fixed formats so that a
change in the science shows up as a diff of claims.csv / claims.md.
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..analysis import plots
from ..analysis.tables import paper_target
from .aggregate import MODEL_ORDER, Run, find_runs, training_runs
from .paper_figures import Analysed, analysed_runs, excludes_loss_increase, select

log = logging.getLogger(__name__)
HELD, NOT_HELD, NOT_MEASURABLE = "held", "not held", "not measurable"
MOST = 0.5           # "most checkpoints": more than half of (seed, checkpoint) pairs
NEAR_ZERO = 0.1      # PPO's G "close to 0": its median at most this fraction of DPO's median |G|
SAME_ORDER = 10.0    # "of the same order": a ratio within [1/10, 10]
COMPONENTS = ("TOT", "POS", "NEG", "TOP", "MID", "BOT")
ABLATION = re.compile(r"(DPO|PPO) w/o ([A-Z]+)(?: \(steps [^)]*\))?")


# ============================================================================================ evidence


@dataclass
class Evidence:
    """What one model's runs hold: per family, G at every checkpoint of every seed; per role, final win rates."""
    model: str
    judge: str | None = None
    g: dict[str, pd.DataFrame] = field(default_factory=dict)       # family -> run, seed, step, component, G, ...
    win: dict[str, pd.Series] = field(default_factory=dict)        # role -> final win rate per seed
    advantages: dict[str, pd.DataFrame] = field(default_factory=dict)  # family -> step, TOP, MID, BOT (per run)

    def has(self, need: str) -> bool:
        kind, what = need.split(":")
        store = {"G": self.g, "win": self.win, "adv": self.advantages}[kind]
        return what in store and not store[what].empty


def role_of(summary: dict) -> str | None:
    """A run's role in the claims: dpo / ppo (the default parameters), or <family>_wo_<component> for Fig. 4's
    ablations; None for every other method (cases, other parameters, runs without SFT)."""
    family, variant, method = summary.get("family"), summary.get("variant"), summary.get("method", "")
    if not summary.get("sft", True) or family not in ("dpo", "ppo"):
        return None
    if variant == "baseline" and method == family.upper():
        return family
    match = ABLATION.fullmatch(method) if variant == "ablation" else None
    if match and match[1].lower() == family:
        return f"{family}_wo_{match[2].lower()}"
    return None


def g_checkpoints(tables: list[Analysed]) -> pd.DataFrame:
    """One row per (run, checkpoint, component) of the runs' G tables (all layers, the paper's D')."""
    frames = []
    for a in tables:
        table = paper_target(a.alignment)
        table = table[(table["layer_group"] == "all") & table["component"].isin(COMPONENTS)]
        if excludes_loss_increase(a.run.dir):  # App. A, as the G figures
            table = table[~plots._as_bool(table["loss_increased"])]
        columns = [c for c in ("step", "component", "G", "G_unfiltered", "n_batches", "n_outliers", "grad_norm")
                   if c in table]
        frames.append(table[columns].assign(run=str(a.run.dir), seed=a.run.summary["seed"]))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).sort_values(["run", "step", "component"]).reset_index(drop=True)


def final_win_rates(runs: list[Run], judge: str) -> pd.Series:
    """The final checkpoint's win rate of each run under `judge`, indexed by seed (sorted)."""
    values = {}
    for run in runs:
        rates = run.win_rates
        if rates.empty or "judge" not in rates:
            continue
        rates = rates[rates["judge"] == judge]
        if len(rates):
            values[run.summary["seed"]] = float(rates.loc[rates["step"].idxmax(), "win_rate"])
    return pd.Series(values, dtype=float).sort_index()


def advantage_rows(runs: list[Run]) -> pd.DataFrame:
    frames = [plots.advantage_history(h).assign(run=str(r.dir)) for r in runs
              if (h := plots.load_log_history(r.dir))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def gather(root: Path) -> list[Evidence]:
    """Per model (MODEL_ORDER first), the evidence its runs under `root` hold."""
    every = find_runs(root)
    trained = training_runs(every)
    tables = analysed_runs(every)
    models = sorted({r.summary["model"] for r in every},
                    key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))
    found = []
    for model in models:
        roles: dict[str, list[Run]] = {}
        for run in trained:
            if run.summary["model"] == model and (role := role_of(run.summary)):
                roles.setdefault(role, []).append(run)
        judges = Counter(r.summary.get("judge") for runs in roles.values() for r in runs if r.summary.get("judge"))
        judge = min(judges, key=lambda j: (-judges[j], j)) if judges else None
        evidence = Evidence(model, judge)
        for family in ("dpo", "ppo"):
            g = g_checkpoints(select(tables, model, family))
            if not g.empty:
                evidence.g[family] = g
        for role, runs in roles.items():
            evidence.win[role] = final_win_rates(runs, judge) if judge else pd.Series(dtype=float)
        if "ppo" in roles:
            evidence.advantages["ppo"] = advantage_rows(roles["ppo"])
        if evidence.g or any(not s.empty for s in evidence.win.values()):
            found.append(evidence)
    return found


# ============================================================================================ measures


def num(x: float) -> str:
    """A fixed format for every measured number: 4 significant digits (G spans decades)."""
    return "nan" if x is None or math.isnan(x) else f"{x:.4g}"


def component(g: pd.DataFrame, name: str, column: str = "G") -> pd.DataFrame:
    """run, seed, step, value of one component (NaN dropped)."""
    rows = g.loc[g["component"] == name, ["run", "seed", "step", column]].dropna()
    return rows.rename(columns={column: "value"}).reset_index(drop=True)


def wide(g: pd.DataFrame, names, column: str = "G") -> pd.DataFrame:
    """One row per (run, step), one column per component, rows with a NaN dropped."""
    rows = g[g["component"].isin(names)].pivot_table(index=["run", "step"], columns="component", values=column)
    return rows.reindex(columns=list(names)).dropna().reset_index()


def fraction(mask: pd.Series) -> tuple[int, int]:
    return int(mask.sum()), len(mask)


def frac_text(k: int, n: int) -> str:
    return f"{k}/{n} = {num(k / n)}"


Outcome = tuple[str, "bool | None"]  # (measured, held); held None: not measurable (with the reason as measured)


def dpo_g_positive(e: Evidence) -> Outcome:
    tot = component(e.g["dpo"], "TOT")
    if tot.empty:
        return "no checkpoint with G", None
    k, n = fraction(tot["value"] > 0)
    return f"G_TOT > 0 at {frac_text(k, n)} of (seed, checkpoint); median G_TOT {num(tot['value'].median())}", \
        k / n > MOST


def ppo_g_near_zero(e: Evidence) -> Outcome:
    ppo, dpo = component(e.g["ppo"], "TOT"), component(e.g["dpo"], "TOT")
    if ppo.empty or dpo.empty:
        return "no checkpoint with G", None
    median, scale = ppo["value"].median(), dpo["value"].abs().median()
    return (f"median PPO G_TOT {num(median)}; median DPO |G_TOT| {num(scale)}; ratio {num(median / scale)}",
            median <= NEAR_ZERO * scale)


def thirds(steps: list[int]) -> tuple[list[int], list[int]]:
    """The first and the last third of a run's checkpoints (at least one each)."""
    k = max(1, round(len(steps) / 3))
    return steps[:k], steps[-k:]


def dpo_roles_exchange(e: Evidence) -> Outcome:
    table = wide(e.g["dpo"], ("POS", "NEG"))
    early, late = [], []
    for _, run in table.groupby("run", sort=True):
        steps = sorted(run["step"])
        if len(steps) < 2:
            continue
        first, last = thirds(steps)
        diff = run.set_index("step")["POS"] - run.set_index("step")["NEG"]
        early.append(diff.loc[first].mean())
        late.append(diff.loc[last].mean())
    if not early:
        return "fewer than 2 checkpoints per run", None
    e_med, l_med = pd.Series(early).median(), pd.Series(late).median()
    return (f"median over {len(early)} seed(s) of mean(G_POS - G_NEG): early {num(e_med)}, late {num(l_med)}",
            bool(e_med > 0 and l_med <= 0))


def ppo_pos_shapes_neg_offsets(e: Evidence) -> Outcome:
    table = wide(e.g["ppo"], ("POS", "NEG"))
    if table.empty:
        return "no checkpoint with G_POS and G_NEG", None
    k, n = fraction((table["POS"] > 0) & (table["NEG"] < table["POS"]))
    k_neg, _ = fraction(table["NEG"] < 0)
    measured = (f"G_POS > 0 and G_NEG < G_POS at {frac_text(k, n)}; G_NEG < 0 at {frac_text(k_neg, n)}; "
                f"median G_POS {num(table['POS'].median())}, G_NEG {num(table['NEG'].median())}")
    return measured, k / n > MOST


def rate_text(e: Evidence, role: str) -> str:
    s = e.win[role]
    spread = f" ± {num(s.std())}" if len(s) > 1 else ""
    return f"{role} {num(s.mean())}{spread} (n={len(s)})"


def difference_text(e: Evidence, a: str, b: str) -> str:
    """mean(a) - mean(b) and its standard error over seeds (nan with one seed): how far from noise a verdict is."""
    x, y = e.win[a], e.win[b]
    se = math.sqrt(x.var() / len(x) + y.var() / len(y)) if len(x) > 1 and len(y) > 1 else math.nan
    return f"{a} - {b} {num(x.mean() - y.mean())} (standard error {num(se)})"


def wo_top_below_wo_mid(e: Evidence) -> Outcome:
    top, mid = e.win["ppo_wo_top"].mean(), e.win["ppo_wo_mid"].mean()
    texts = [rate_text(e, "ppo_wo_top"), rate_text(e, "ppo_wo_mid"), difference_text(e, "ppo_wo_top", "ppo_wo_mid")]
    return "; ".join(texts), bool(top < mid)


def ablations_below(baseline: str, ablations: tuple[str, ...]) -> Callable[[Evidence], Outcome]:
    def measure(e: Evidence) -> Outcome:
        base = e.win[baseline].mean()
        texts = [rate_text(e, r) for r in (baseline, *ablations)] + [difference_text(e, r, baseline)
                                                                     for r in ablations]
        return "; ".join(texts), all(e.win[r].mean() < base for r in ablations)
    return measure


def filtering_matters_more_for_dpo(e: Evidence) -> Outcome:
    shares, outliers = {}, {}
    for family in ("dpo", "ppo"):
        tot = e.g[family][e.g[family]["component"] == "TOT"].dropna(subset=["G", "G_unfiltered"])
        if tot.empty or tot["G"].abs().mean() == 0:
            return f"{family}: no checkpoint with G", None
        shares[family] = (tot["G"] - tot["G_unfiltered"]).abs().mean() / tot["G"].abs().mean()
        batches = tot["n_batches"].sum() if "n_batches" in tot else 0
        outliers[family] = tot["n_outliers"].sum() / batches if batches else math.nan
    measured = (f"mean|G - G_unfiltered| / mean|G| (TOT): DPO {num(shares['dpo'])}, PPO {num(shares['ppo'])}; "
                f"outlier mini-batches: DPO {num(outliers['dpo'])}, PPO {num(outliers['ppo'])}")
    return measured, bool(shares["dpo"] > shares["ppo"])


def medians(g: pd.DataFrame, names) -> dict[str, float]:
    return {c: component(g, c)["value"].median() for c in names}


def ppo_top_mid_negative(e: Evidence) -> Outcome:
    m = medians(e.g["ppo"], ("TOP", "MID"))
    if any(math.isnan(v) for v in m.values()):
        return "no checkpoint with G_TOP / G_MID", None
    return (f"median G_TOP {num(m['TOP'])}, G_MID {num(m['MID'])}",
            bool(m["TOP"] < 0 and m["MID"] < 0 and m["TOP"] < m["MID"]))


def ppo_bot_nearest_zero(e: Evidence) -> Outcome:
    m = medians(e.g["ppo"], ("TOP", "MID", "BOT"))
    if any(math.isnan(v) for v in m.values()):
        return "no checkpoint with G_TOP / G_MID / G_BOT", None
    return (f"median G_BOT {num(m['BOT'])}, G_TOP {num(m['TOP'])}, G_MID {num(m['MID'])}",
            bool(abs(m["BOT"]) < min(abs(m["TOP"]), abs(m["MID"]))))


def ppo_advantages_top_negative_mid_positive(e: Evidence) -> Outcome:
    adv = e.advantages["ppo"]
    if "TOP" not in adv or adv[["TOP", "MID"]].dropna().empty:
        return "no logged advantages of the thirds", None
    top, mid = adv["TOP"].mean(), adv["MID"].mean()
    return f"mean advantage over logged updates: TOP {num(top)}, MID {num(mid)}", bool(top < 0 < mid)


def dpo_norms_same_order(e: Evidence) -> Outcome:
    table = wide(e.g["dpo"], ("POS", "NEG"), column="grad_norm")
    table = table[table["NEG"] > 0]
    if table.empty:
        return "no POS / NEG gradient norms", None
    ratio = table["POS"] / table["NEG"]
    k, n = fraction((ratio >= 1 / SAME_ORDER) & (ratio <= SAME_ORDER))
    return f"|grad POS| / |grad NEG|: median {num(ratio.median())}, within [0.1, 10] at {frac_text(k, n)}", k == n


def dpo_top_not_consistently_first(e: Evidence) -> Outcome:
    table = wide(e.g["dpo"], ("TOP", "MID", "BOT"))
    if table.empty:
        return "no checkpoint with G_TOP / G_MID / G_BOT", None
    k, n = fraction(table["TOP"] >= table[["MID", "BOT"]].max(axis=1))
    return f"G_TOP the largest of the thirds at {frac_text(k, n)}", k < n


# ============================================================================================ the claims


@dataclass(frozen=True)
class Claim:
    id: str
    source: str       # section and figure of the paper
    statement: str    # the paper's words
    rule: str         # what decides "held" here
    needs: tuple[str, ...]  # G:<family> | win:<role> | adv:<family>
    measure: Callable[[Evidence], Outcome]
    note: str = ""


CLAIMS = (
    Claim("dpo_g_positive", "Sec. 3.1, Fig. 1(a)",
          "\"G keeps positive and notably larger than 0, indicating stable targets with supervised learning "
          "behaviors\"",
          f"DPO's G_TOT > 0 at more than {MOST:g} of (seed, checkpoint) pairs", ("G:dpo",), dpo_g_positive),
    Claim("ppo_g_near_zero", "Sec. 3.2, Fig. 2(a)",
          "\"G keeps close to 0 but slightly negative, thus aligning well with reinforcement behaviors\"",
          f"median over (seed, checkpoint) of PPO's G_TOT <= {NEAR_ZERO:g} x the median of DPO's |G_TOT| "
          "(near zero, or negative)", ("G:ppo", "G:dpo"), ppo_g_near_zero),
    Claim("dpo_roles_exchange", "Sec. 3.1, Fig. 1(b); App. D",
          "\"At the start, positive learning takes the lead in shaping the targets, while negative learning acts to "
          "offset its impacts [...] as training progresses, [...] negative learning begins to shape the learning "
          "targets\"",
          "per seed, mean of G_POS - G_NEG over the first third of checkpoints (early) and the last third (late); "
          "median over seeds: early > 0 and late <= 0", ("G:dpo",), dpo_roles_exchange,
          note="expected weak at this scale: the paper ties the exchange to overfitting y+ over 7.6k steps"),
    Claim("ppo_pos_shapes_neg_offsets", "Sec. 3.2, Fig. 2(b)",
          "\"positive learning is stable in shaping the learning targets, while negative learning keeps offsetting "
          "positive learning\"",
          f"G_POS > 0 and G_NEG < G_POS at more than {MOST:g} of PPO's (seed, checkpoint) pairs", ("G:ppo",),
          ppo_pos_shapes_neg_offsets),
    Claim("ppo_top_mid_negative", "Sec. 3.2, Fig. 2(c)",
          "\"the middle and top weighted components exhibit negative impacts on the final responses, with the top "
          "weighted data having a much stronger effect\"",
          "medians over PPO's (seed, checkpoint): G_TOP < 0, G_MID < 0 and G_TOP < G_MID", ("G:ppo",),
          ppo_top_mid_negative),
    Claim("ppo_bot_nearest_zero", "Sec. 3.2, Fig. 2(c)",
          "\"G for the bottom weighted data is closer to 0\"",
          "|median G_BOT| < |median G_TOP| and < |median G_MID| (PPO)", ("G:ppo",), ppo_bot_nearest_zero),
    Claim("ppo_advantages_top_negative", "Sec. 3.2, Fig. 3",
          "\"the middle weighted data exhibit overall positive advantages [...] For the top weighted data, [...] "
          "overall negative advantages\"",
          "mean over logged PPO updates (and seeds) of the signed advantage of the top third < 0 < that of the "
          "middle third", ("adv:ppo",), ppo_advantages_top_negative_mid_positive),
    Claim("dpo_top_not_first", "Sec. 3.1, Fig. 1(c)",
          "\"higher weighted data do not consistently contribute more to the learning targets\"",
          "G_TOP is not the largest of G_TOP / G_MID / G_BOT at every DPO (seed, checkpoint)", ("G:dpo",),
          dpo_top_not_consistently_first),
    Claim("dpo_norms_same_order", "Sec. 3.1; App. D, Fig. 8(a)",
          "\"the gradient magnitudes of positive and negative learning remain of the same order throughout DPO "
          "training\"",
          f"mean kept-batch gradient norm of POS / NEG within [1/{SAME_ORDER:g}, {SAME_ORDER:g}] at every DPO "
          "(seed, checkpoint)", ("G:dpo",), dpo_norms_same_order),
    Claim("filtering_matters_more_for_dpo", "App. D, Fig. 6",
          "\"The influence of gradient outliers is stronger for DPO than for PPO, notably changing the behaviors of "
          "the former\"",
          "mean |G - G_unfiltered| / mean |G| of TOT over (seed, checkpoint) larger for DPO than for PPO",
          ("G:dpo", "G:ppo"), filtering_matters_more_for_dpo,
          note="the paper's explanation, outliers more frequent in DPO, is measured beside it"),
    Claim("ppo_wo_top_below_wo_mid", "Sec. 4, Fig. 4(b)",
          "\"middle weighted data [...] their removal induces instability. By contrast, top weighted data are overall "
          "dispreferred, and removing them hinders the model from further exploration, thus resulting in degraded "
          "performance\"",
          "mean final win rate over seeds: PPO w/o TOP < PPO w/o MID", ("win:ppo_wo_top", "win:ppo_wo_mid"),
          wo_top_below_wo_mid),
    Claim("ppo_ablations_hurt", "Sec. 4, Fig. 4(b)",
          "\"removing components with negative G leads to decreased performance and/or unstable optimization\"",
          "mean final win rate over seeds: PPO w/o TOP < PPO and PPO w/o MID < PPO",
          ("win:ppo", "win:ppo_wo_top", "win:ppo_wo_mid"), ablations_below("ppo", ("ppo_wo_top", "ppo_wo_mid")),
          note="instability is not measured"),
    Claim("dpo_ablations_hurt", "Sec. 4, Fig. 4(a)",
          "\"removing components with negative G leads to decreased performance and/or unstable optimization\"",
          "mean final win rate over seeds: DPO w/o NEG early < DPO and DPO w/o POS late < DPO",
          ("win:dpo", "win:dpo_wo_neg", "win:dpo_wo_pos"), ablations_below("dpo", ("dpo_wo_neg", "dpo_wo_pos")),
          note="instability is not measured"),
)


def evaluate(claim: Claim, e: Evidence) -> dict:
    missing = [n for n in claim.needs if not e.has(n)]
    if missing:
        measured, held = f"missing: {', '.join(missing)}", None
    else:
        measured, held = claim.measure(e)
    verdict = NOT_MEASURABLE if held is None else HELD if held else NOT_HELD
    return {"model": e.model, "claim": claim.id, "source": claim.source, "verdict": verdict, "measured": measured,
            "rule": claim.rule, "statement": claim.statement, "note": claim.note,
            "judge": e.judge if any(n.startswith("win:") for n in claim.needs) else ""}


def claims_table(evidence: list[Evidence]) -> pd.DataFrame:
    """One row per (model, claim): models in MODEL_ORDER, claims in CLAIMS' order."""
    columns = ["model", "claim", "source", "verdict", "measured", "rule", "statement", "note", "judge"]
    return pd.DataFrame([evaluate(c, e) for e in evidence for c in CLAIMS], columns=columns)


def seeds_text(e: Evidence) -> str:
    parts = [f"{f.upper()} G: {g['run'].nunique()} run(s)" for f, g in sorted(e.g.items())]
    parts += [f"{role}: {len(s)} run(s)" for role, s in sorted(e.win.items())]
    return "; ".join(parts) or "no runs"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(table: pd.DataFrame, evidence: list[Evidence]) -> str:
    parts = []
    by_model = {e.model: e for e in evidence}
    for model, rows in table.groupby("model", sort=False):
        e = by_model[model]
        counts = rows["verdict"].value_counts()
        parts.append(f"### The paper's claims ({model})\n")
        parts.append(f"{counts.get(HELD, 0)} held, {counts.get(NOT_HELD, 0)} not held, "
                     f"{counts.get(NOT_MEASURABLE, 0)} not measurable of {len(rows)}. Runs: {seeds_text(e)}. "
                     f"G: all layers, IQR-filtered, the paper's held-out D', App. A's left-out checkpoints excluded; "
                     f"win rates: final checkpoint, judge {e.judge or '—'}.\n")
        parts.append("| Claim | Paper | Verdict | Measured | Rule |")
        parts.append("|---|---|---|---|---|")
        for row in rows.itertuples():
            paper = f"{row.source}: {row.statement}" + (f" ({row.note})" if row.note else "")
            parts.append(f"| {row.claim} | {_cell(paper)} | **{row.verdict}** | {_cell(row.measured)} | "
                         f"{_cell(row.rule)} |")
        parts.append("")
    return "\n".join(parts)


def write_claims(root: Path, out: Path) -> dict[str, Path]:
    """claims.csv / claims.md of the runs under `root`; {} when no model has a DPO or PPO run the claims read."""
    evidence = gather(Path(root))
    if not evidence:
        log.info("claims: no DPO / PPO run (default parameters, with SFT) under %s", root)
        return {}
    table = claims_table(evidence)
    out.mkdir(parents=True, exist_ok=True)
    written = {name: out / name for name in ("claims.csv", "claims.md")}
    table.to_csv(written["claims.csv"], index=False)
    written["claims.md"].write_text(markdown(table, evidence))
    return written
