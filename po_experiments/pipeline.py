"""The whole job: SFT (cached) -> preference data -> PO training with checkpoints -> win rate -> summary.json.

Re-running a finished run dir trains nothing: it only adds what it is asked for and has not got (G with these
analysis settings, verdicts of another judge); an unfinished one resumes from its last checkpoint.
In a multi-process job every rank runs this; training and the sharded G analysis are collective, rank 0 alone
evaluates and writes the summary (`distributed`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import set_seed

from . import distributed, run_length, tracking
from .data.sources import preflight_sources
from .analysis import variants
from .controllers.g_balance import controller_summary
from .config import EvalConfig, stage_settings
from .models import resolve_model_source, set_threads
from .evaluation import judges
from .atomic import write_json
from .evaluation.stage import evaluate, judged, share_outputs
from .generation import backend as generation
from .reporting.methods import describe
from .rewards import preflight_reward
from .stages.sft import reference_kind, start_model_dir, task_sft_dir
from .families import family_of
from .tasks import task_of

log = logging.getLogger(__name__)


def preflight(cfg) -> None:
    """Checks that must fail in seconds rather than after an hour of SFT."""
    if cfg.model.path is not None:
        resolve_model_source(cfg.model)
    preflight_reward(cfg)
    judges.preflight(cfg)
    preflight_sources(cfg)
    generation.preflight(cfg)


def analyse_finished(cfg, run_dir: Path, summary: dict) -> dict:
    """Every rank: a finished run asked for G it has not got (analysis enabled; these analysis settings missing at
    some checkpoint, e.g. a run trained by a win-rate preset without G, or Fig. 7's D') is analysed from its saved
    checkpoints, into the folder of those settings (variants); nothing is trained again."""
    if not distributed.broadcast(distributed.is_main() and variants.pending(cfg, run_dir)):
        return summary
    log.info("run already finished; analysing its checkpoints with these analysis settings")
    set_threads(cfg.runtime.threads, cfg.runtime.deterministic)
    table = variants.analyse(cfg, run_dir, Path(summary["sft_dir"]))
    if table is not None and distributed.is_main():
        if table.parent == run_dir:
            summary["alignment"] = str(table)
        else:
            summary["alignment_variants"] = sorted({*summary.get("alignment_variants", []), str(table)})
        write_json(run_dir / "summary.json", summary)
    return summary


JUDGE_SETTINGS = ("judge", "reward_model", "alpaca_eval")  # a judge's verdicts are kept apart per judge


def output_settings(cfg) -> dict:
    """The evaluation settings that determine the win-rate outputs of a run (prompts, lengths, checkpoints)."""
    return {k: v for k, v in stage_settings(cfg.eval, EvalConfig).items() if k not in JUDGE_SETTINGS}


def warn_other_eval_settings(cfg, summary: dict) -> None:
    """Evaluation settings are no part of a run's identity and its outputs are not keyed by them: a finished run
    asked for others keeps the win rates it has (say so, naming the keys)."""
    recorded, wanted = summary.get("eval_settings"), output_settings(cfg)
    if recorded is None:
        return
    differ = sorted(k for k in wanted if recorded.get(k) != wanted[k])
    if differ:
        log.warning("finished run evaluated with other settings (%s): its win rates stay those (outputs and "
                    "verdicts are not keyed by evaluation settings); train it under another `name` for these",
                    ", ".join(f"eval.{k}={recorded.get(k)} (asked: {wanted[k]})" for k in differ))


def finished_run(cfg, run_dir: Path, summary: dict) -> dict:
    """A finished run does nothing again, unless asked for a judge it has no verdicts of: then that judge reads
    the outputs already generated at every checkpoint (nothing is trained or generated again)."""
    warn_other_eval_settings(cfg, summary)
    judge = judges.resolve_judge(cfg)
    if judge == "none" or not judged(run_dir, judges.judge_name(cfg, judge)).empty:
        log.info("run already finished (win rate %s): %s", summary.get("win_rate"), run_dir / "summary.json")
        return summary
    log.info("run already finished; judging its outputs with %s", judge)
    set_threads(cfg.runtime.threads, cfg.runtime.deterministic)
    judges.preflight(cfg)
    result = evaluate(cfg, run_dir, Path(summary["sft_dir"]), summary["final_step"])
    summary.update(result, win_rates={**summary.get("win_rates", {}), result["judge"]: result["win_rate"]})
    write_json(run_dir / "summary.json", summary)
    return summary


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def run(cfg) -> dict:
    distributed.setup(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = analyse_finished(cfg, run_dir, json.loads(summary_path.read_text()))
        return finished_run(cfg, run_dir, summary) if distributed.is_main() else summary

    started = time.time()
    set_threads(cfg.runtime.threads, cfg.runtime.deterministic)
    set_seed(cfg.seed)
    preflight(cfg)
    wandb_run = tracking.start(cfg, run_dir) if distributed.is_main() else None

    sft_dir = start_model_dir(cfg)  # the SFT model, or the base model with sft.enabled=false
    family = family_of(cfg)
    if task_of(cfg).embedded and family.needs_task_model(cfg):
        task_sft_dir(cfg, sft_dir)  # every rank: the task's pairs / RM come from the SFT model, with or without SFT
    policy = family.train(cfg, sft_dir, run_dir, tracking.report_to(wandb_run))
    share_outputs(cfg, run_dir, sft_dir, policy.final_step)  # every rank generates; rank 0 then judges alone
    result = distributed.main_first(lambda: evaluate(cfg, run_dir, sft_dir, policy.final_step, wandb_run))
    alignment = variants.analyse(cfg, run_dir, sft_dir, wandb_run)
    if not distributed.is_main():
        log.info("rank %d: done; rank 0 writes the summary", distributed.rank())
        return {"rank": distributed.rank(), "final_step": policy.final_step}

    summary = {
        "algo": cfg.algo.name, "model": cfg.model.name, "seed": cfg.seed, "ablation": cfg.ablation.name,
        **describe(cfg), "data": cfg.data.name, "final_step": policy.final_step, "final_loss": policy.final_loss,
        **result, "win_rates": {result["judge"]: result["win_rate"]} if result["judge"] != "none" else {},
        "alignment": str(alignment) if alignment else None, "resumed_from": policy.resumed_from,
        "sft_dir": str(sft_dir), "sft": cfg.sft.enabled, "reference": reference_kind(cfg),
        "wall_time_s": round(time.time() - started, 1), "eval_settings": output_settings(cfg),
        "step_unit": run_length.unit(cfg), "run_length": _read_json(run_dir / "run_length.json"),
        **controller_summary(run_dir),  # controller_overhead: its seconds / the training's (controllers/)
    }
    write_json(summary_path, summary)
    tracking.finish(wandb_run, summary)
    if not cfg.sft.enabled:
        log.info("no SFT: the win rate %s is against the base model, not an SFT model", summary.get("win_rate"))
    log.info("summary: %s", summary_path)
    return summary
