"""The evaluation stage: the win rate against the SFT model at every checkpoint (paper App. C.3, Fig. 4).

Greedy outputs on held-out prompts (the synthetic task) or, on real data, AlpacaEval's instructions (default) or
the HH-RLHF helpful questions (`eval.prompts=hh_helpful`) are generated once per checkpoint and kept in
AlpacaEval's format (`eval/outputs/reference.json`, `eval/outputs/step-<N>.json`); each judge's verdicts go to
`eval/<judge>/step-<N>.json`. So a second judge reuses every output, a killed evaluation continues at the next
checkpoint, and `win_rate.csv` holds one row per (judge, step). Another prompt set than the default goes under
names ending in `@<eval.prompts>` (`eval/outputs@hh_helpful/`, judge `gold@hh_helpful`), beside the default's.

The reference (the SFT model's greedy outputs) is generated once per SFT model, prompt set and max_new_tokens,
in `<paths.cache_dir>/reference_outputs/<hash>.json`, and copied into each run: every PO seed of a sweep shares
one SFT model (`sft.seed`), so they are judged against the same reference, generated once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import pandas as pd
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .. import distributed
from ..cache import config_hash
from ..atomic import write_csv, write_json
from ..checkpoints import step_dirs
from ..generation.backend import generate_texts, shared_generate_texts
from ..tasks import EvalPrompts, task_of
from .judges import build_judge, prompts_suffix
from .winrate import win_rate

log = logging.getLogger(__name__)
TABLE = "win_rate.csv"
COLUMNS = ["judge", "step", "win_rate", "win_rate_se", "n", "n_wins", "n_draws", "n_dropped", "lc_win_rate",
           "lc_win_rate_se"]


def eval_prompts(cfg, tokenizer) -> EvalPrompts:
    max_new_tokens = cfg.eval.max_new_tokens or cfg.data.max_new_tokens
    return task_of(cfg).eval_prompts(cfg, tokenizer, cfg.eval.n_prompts, max_new_tokens)


def outputs_dir(cfg, run_dir: Path) -> Path:
    return run_dir / "eval" / f"outputs{prompts_suffix(cfg)}"


def models_to_evaluate(cfg, run_dir: Path, final_step: int) -> dict[int, Path]:
    """step -> model folder: every checkpoint (or only the final model), the final model at its step."""
    models = {} if cfg.eval.checkpoints == "final" else dict(step_dirs(run_dir / "checkpoints"))
    if final_step not in models:
        models[final_step] = run_dir / "model"
    return dict(sorted(models.items()))


# --------------------------------------------------------------------------------------------- outputs


def cached_outputs(path: Path, prompts: EvalPrompts) -> list[str] | None:
    if not path.exists():
        return None
    records = json.loads(path.read_text())
    if [r["instruction"] for r in records] == prompts.instructions:
        return [r["output"] for r in records]
    log.warning("%s was written for other prompts; generating again", path)
    return None


def write_outputs(path: Path, prompts: EvalPrompts, outputs: list[str], generator: str) -> None:
    write_json(path, [{"instruction": i, "output": o, "generator": generator, "dataset": d, "index": k}
                             for i, o, d, k in zip(prompts.instructions, outputs, prompts.dataset, prompts.index)])


def greedy_outputs(path: Path, model_dir: Path, prompts: EvalPrompts, cfg, generator: str) -> list[str]:
    """The model's greedy outputs as AlpacaEval records in `path`, generated unless already there."""
    outputs = cached_outputs(path, prompts)
    if outputs is None:
        outputs = generate_texts(cfg, model_dir, prompts.model_inputs, max_new_tokens=prompts.max_new_tokens,
                                 desc=f"greedy outputs: {path.stem}")
        write_outputs(path, prompts, outputs, generator)
    return outputs


def reference_cache(cfg, sft_dir: Path, prompts: EvalPrompts) -> Path:
    """The SFT model's greedy outputs, shared by every run on that SFT model: keyed by the model folder, what it is
    fed (the prompts after the chat template) and max_new_tokens."""
    inputs = hashlib.sha256(json.dumps([prompts.instructions, prompts.model_inputs]).encode()).hexdigest()
    key = {"sft_dir": str(Path(sft_dir).resolve()), "inputs": inputs, "max_new_tokens": prompts.max_new_tokens}
    return Path(cfg.paths.cache_dir) / "reference_outputs" / f"{config_hash(key)}.json"


def reference_outputs(cfg, run_dir: Path, sft_dir: Path, prompts: EvalPrompts, generator: str) -> list[str]:
    """The run's `reference.json`: its own copy if there (a resumed run), else the shared one, generated under a
    file lock if no run on this SFT model has generated it yet (concurrent jobs of a sweep wait, then reuse)."""
    path = outputs_dir(cfg, run_dir) / "reference.json"
    outputs = cached_outputs(path, prompts)
    if outputs is not None:
        return outputs
    shared = reference_cache(cfg, sft_dir, prompts)
    shared.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        outputs = greedy_outputs(shared, sft_dir, prompts, cfg, generator)
    write_outputs(path, prompts, outputs, generator)
    return outputs


def generator_names(cfg) -> tuple[str, str]:
    reference = "sft" if cfg.sft.enabled else "base"  # sft.enabled=false: the win rate is against the base model
    return f"{reference}-{cfg.model.name}", f"{cfg.algo.name}-{cfg.model.name}-seed{cfg.seed}"


def models_to_generate(cfg, run_dir: Path, sft_dir: Path, final_step: int) -> dict[str, tuple[Path, str]]:
    """Output file stem -> (model folder, generator name): the SFT reference and every model evaluated."""
    reference, policy = generator_names(cfg)
    return {"reference": (sft_dir, reference),
            **{f"step-{s}": (f, policy) for s, f in models_to_evaluate(cfg, run_dir, final_step).items()}}


def share_outputs(cfg, run_dir: Path, sft_dir: Path, final_step: int) -> None:
    """A multi-process job, every rank: the greedy outputs of each model not generated yet, its prompts shared
    over the ranks (each on its own device); rank 0 writes them, and `evaluate` on rank 0 then only judges."""
    if distributed.world() == 1:
        return
    prompts = eval_prompts(cfg, AutoTokenizer.from_pretrained(sft_dir))
    out_dir = outputs_dir(cfg, run_dir)
    models = models_to_generate(cfg, run_dir, sft_dir, final_step)
    # the reference goes to the shared cache (evaluate copies it into the run); two multi-process jobs starting
    # together may both generate it: the same outputs, written atomically
    paths = {stem: reference_cache(cfg, sft_dir, prompts) if stem == "reference" else out_dir / f"{stem}.json"
             for stem in models}
    if cached_outputs(out_dir / "reference.json", prompts) is not None:
        paths.pop("reference")
    todo = distributed.broadcast([stem for stem, path in paths.items() if cached_outputs(path, prompts) is None]
                                 if distributed.is_main() else None)
    for stem in todo:
        folder, generator = models[stem]
        outputs = shared_generate_texts(cfg, folder, prompts.model_inputs, max_new_tokens=prompts.max_new_tokens,
                                        desc=f"greedy outputs: {stem} (rank {distributed.rank()}'s share)")
        if distributed.is_main():
            write_outputs(paths[stem], prompts, outputs, generator)
            if stem == "reference":  # and the run's copy
                write_outputs(out_dir / "reference.json", prompts, outputs, generator)


def pairs(prompts: EvalPrompts, reference: list[str], candidate: list[str], names: tuple[str, str]) -> list[dict]:
    return [{"instruction": i, "output_1": r, "generator_1": names[0], "output_2": c, "generator_2": names[1],
             "dataset": d, "index": k, "prompt": p}
            for i, p, d, k, r, c in zip(prompts.instructions, prompts.model_inputs, prompts.dataset, prompts.index,
                                        reference, candidate)]


# --------------------------------------------------------------------------------------------- verdicts


def length_controlled(verdicts: list[dict]) -> tuple[float | None, float | None]:
    """alpaca_eval's length-controlled win rate; it needs its GLM's data from the Hub (AlpacaEval's 805)."""
    from alpaca_eval.metrics import get_length_controlled_winrate

    df = pd.DataFrame(verdicts)
    try:
        lc = get_length_controlled_winrate(df, save_weights_dir=None, is_warn_extreme_changes=False)
    except Exception as err:  # offline, or instructions that are not AlpacaEval's
        log.warning("length-controlled win rate not computed: %s", str(err).splitlines()[0][:200])
        return None, None
    return float(lc["length_controlled_winrate"]), float(lc["lc_standard_error"])


def judged_row(judge: str, step: int, verdicts: list[dict], lc_enabled: bool) -> dict:
    wr = win_rate(v["preference"] for v in verdicts)
    lc, lc_se = length_controlled(verdicts) if lc_enabled else (None, None)
    return {"judge": judge, "step": step, "win_rate": wr.win_rate, "win_rate_se": wr.standard_error,
            "n": wr.n, "n_wins": wr.n_wins, "n_draws": wr.n_draws, "n_dropped": wr.n_dropped,
            "lc_win_rate": lc, "lc_win_rate_se": lc_se}


def write_table(path: Path, rows: list[dict]) -> pd.DataFrame:
    """Merge rows into win_rate.csv (a judge's row for a step replaces the old one), atomically."""
    new = pd.DataFrame(rows, columns=COLUMNS)
    table = pd.concat([pd.read_csv(path), new]) if path.exists() else new
    table = table.drop_duplicates(["judge", "step"], keep="last").sort_values(["judge", "step"])
    write_csv(path, table, float_format="%.4f")
    return table


def judged(run_dir: Path, judge_name: str) -> pd.DataFrame:
    path = run_dir / TABLE
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    table = pd.read_csv(path)
    return table[table["judge"] == judge_name]


# --------------------------------------------------------------------------------------------- the stage


def evaluate(cfg, run_dir: Path, sft_dir: Path, final_step: int, wandb_run=None) -> dict:
    """Win rate at every checkpoint with `eval.judge`; returns the final checkpoint's (summary.json keys)."""
    prompts = eval_prompts(cfg, AutoTokenizer.from_pretrained(sft_dir))
    names = generator_names(cfg)
    out_dir = outputs_dir(cfg, run_dir)
    reference = reference_outputs(cfg, run_dir, sft_dir, prompts, names[0])
    judge = build_judge(cfg, run_dir / "eval")
    label = None if judge is None else judge.name + prompts_suffix(cfg)  # win_rate.csv's judge, the verdicts' folder
    lc_enabled = getattr(judge, "length_controlled", False) and prompts_suffix(cfg) == ""  # LC: AlpacaEval's 805
    rows, samples = [], []
    for step, folder in tqdm(models_to_evaluate(cfg, run_dir, final_step).items(), desc="win rate per checkpoint"):
        candidate = greedy_outputs(out_dir / f"step-{step}.json", folder, prompts, cfg, names[1])
        if judge is None:
            continue
        path = run_dir / "eval" / label / f"step-{step}.json"
        if path.exists():
            verdicts = json.loads(path.read_text())
        else:
            verdicts = judge.judge(pairs(prompts, reference, candidate, names))
            write_json(path, verdicts)
        rows.append(judged_row(label, step, verdicts, lc_enabled))
        samples += [{"step": step, **v} for v in verdicts[:cfg.eval.n_samples]]
        log.info("win rate at step %d: %.2f ± %.2f (n=%d, %s)", step, rows[-1]["win_rate"], rows[-1]["win_rate_se"],
                 rows[-1]["n"], label)
    if judge is None:
        log.info("eval.judge=none: outputs in %s, no win rate", out_dir)
        return {"win_rate": None, "win_rate_se": None, "n": len(prompts.instructions), "judge": "none"}
    table = write_table(run_dir / TABLE, rows)
    log_to_wandb(wandb_run, rows, samples)
    draw_curve(run_dir, table)
    return final_result(rows[-1], verdicts)


def final_result(row: dict, verdicts: list[dict]) -> dict:
    """summary.json's keys: the final checkpoint's win rate (and the mean rewards where the judge scores)."""
    result = {"win_rate": row["win_rate"], "win_rate_se": row["win_rate_se"], "n": row["n"], "judge": row["judge"],
              "lc_win_rate": row["lc_win_rate"]}
    if verdicts and "reward_2" in verdicts[0]:
        prefix = "gold" if row["judge"] == "gold" else "reward"
        result[f"{prefix}_policy"] = sum(v["reward_2"] for v in verdicts) / len(verdicts)
        result[f"{prefix}_reference"] = sum(v["reward_1"] for v in verdicts) / len(verdicts)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}


def log_to_wandb(run, rows: list[dict], samples: list[dict]) -> None:
    if run is None:
        return
    import wandb

    run.define_metric("eval/*", step_metric="eval/step")
    for r in rows:
        run.log({"eval/step": r["step"], "eval/win_rate": r["win_rate"], "eval/win_rate_se": r["win_rate_se"],
                 **({"eval/lc_win_rate": r["lc_win_rate"]} if r["lc_win_rate"] is not None else {})})
    columns = ["step", "instruction", "reference", "candidate", "preference", "judge"]
    table = wandb.Table(columns=columns, data=[[s["step"], s["instruction"], s["output_1"], s["output_2"],
                                                s["preference"], s["annotator"]] for s in samples])
    run.log({"eval/samples": table})


def draw_curve(run_dir: Path, table: pd.DataFrame) -> Path:
    from ..reporting.figures import win_rate_figure

    path = run_dir / "figures" / "win_rate.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    curves = {judge: rows for judge, rows in table.groupby("judge")}
    fig = win_rate_figure({j: (r["step"].tolist(), r["win_rate"].tolist(), r["win_rate_se"].tolist())
                           for j, r in curves.items()}, title=run_dir.name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
