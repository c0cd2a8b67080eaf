"""The analysis stage: G (Eq. 3) at every saved checkpoint, for every component and layer group.

D' = greedy responses of the *final* model to held-out questions (or training prompts, `analysis.dprime=train`,
the in-distribution variant of Fig. 7b). D = 500 pairs sampled from the training pairs (DPO family) or the
rollout saved with the checkpoint (PPO family). Each finished checkpoint's rows are added to `alignment.csv`
and `alignment_minibatches.csv` by an atomic rewrite, so a killed analysis continues from the next checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import distributed
from ..checkpoints import step_dirs
from ..trainers.loss_check import read_loss_check
from ..data.synthetic import DictionaryTask
from ..generation.backend import shared_generate_texts
from ..models import DTYPES, chat_template_text
from .gradients import (
    GROUPS, choose_method, dpo_alignment, dprime_gradient, encode, encode_pairs, ppo_alignment, ppo_token_coefficients,
    sequence_logps, summarise,
)

from .sample import select_pair_sample
from .sharded import sharded_dpo_alignment, sharded_reference_logps, uses_sharded_analysis

log = logging.getLogger(__name__)
TABLE, MINIBATCHES = "alignment.csv", "alignment_minibatches.csv"


def load_model(folder: Path, dtype: str):
    """Eager attention: vmap (DPO) needs it; forward mode (jvp, PPO) needs it or SDPA's math backend."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], attn_implementation="eager")
    return model.to(device).eval()


def analysis_method(cfg, model) -> str:
    """The DPO-family method for this model: `analysis.method`, or by size when it is `auto`."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return choose_method(cfg.analysis.method, n_params, cfg.analysis.vmap_max_params)


# ------------------------------------------------------------------------------------------------ D' and D


def dprime_prompts(cfg, tokenizer) -> list[str]:
    n = cfg.analysis.n_dprime
    if cfg.data.name == "synthetic":
        task = DictionaryTask.from_config(cfg.data)
        return task.heldout_prompts(n) if cfg.analysis.dprime == "heldout" else task.preference_prompts(n, cfg.sft.seed)
    from ..data.paper import load_preferences, load_questions

    turns = (load_questions(cfg.data, tokenizer) if cfg.analysis.dprime == "heldout"
             else load_preferences(cfg.data, tokenizer))["prompt"][:n]
    return [chat_template_text(tokenizer, t, add_generation_prompt=True) for t in turns]


def dprime_batches(cfg, run_dir: Path, tokenizer, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """D' answered greedily by the final model (cached in analysis/dprime.json), in mini-batches."""
    rows = distributed.main_first(lambda: dprime_rows(cfg, run_dir, tokenizer))
    return [encode(tokenizer, [r["prompt"] for r in rows[i:i + batch_size]],
                   [r["response"] for r in rows[i:i + batch_size]]) for i in range(0, len(rows), batch_size)]


def dprime_cache(cfg, run_dir: Path) -> Path:
    return run_dir / "analysis" / f"dprime_{cfg.analysis.dprime}.json"


def dprime_rows(cfg, run_dir: Path, tokenizer) -> list[dict]:
    cache = dprime_cache(cfg, run_dir)
    if cache.exists():
        return json.loads(cache.read_text())
    return answer_dprime(cfg, run_dir, tokenizer)


def answer_dprime(cfg, run_dir: Path, tokenizer) -> list[dict]:
    """D' answered greedily by the final model, the prompts shared over the job's ranks; rank 0 caches them."""
    prompts = dprime_prompts(cfg, tokenizer)
    answers = shared_generate_texts(cfg, run_dir / "model", prompts, max_new_tokens=cfg.data.max_new_tokens,
                                    desc="D' answers")
    rows = [{"prompt": p, "response": " " + a if cfg.data.name == "synthetic" else a}
            for p, a in zip(prompts, answers)]
    if distributed.is_main():
        cache = dprime_cache(cfg, run_dir)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows, indent=1))
    return rows


def share_dprime_answers(cfg, run_dir: Path, sft_dir: Path) -> None:
    """A multi-process job: every rank answers its share of D' before rank 0 analyses alone (`main_first`)."""
    if distributed.world() == 1:
        return
    pending = distributed.broadcast(distributed.is_main() and not dprime_cache(cfg, run_dir).exists()
                                    and any(s not in done_steps(run_dir) for s in step_dirs(run_dir / "checkpoints")))
    if pending:
        answer_dprime(cfg, run_dir, AutoTokenizer.from_pretrained(sft_dir))


def pair_sample(cfg, sft_dir: Path, tokenizer):
    """D: `analysis.n_pairs` training pairs (seeded), encoded, with their reference (SFT) log-probs."""
    from ..stages.pairs import preference_data

    sample = select_pair_sample(cfg, preference_data(cfg, sft_dir, tokenizer))  # the loss check's sample too
    encoded = encode_pairs(tokenizer, sample)
    encoded = {k: v[:, :cfg.model.max_length] for k, v in encoded.items()}  # as DPO trained on them (keep_start)
    if uses_sharded_analysis(cfg):
        return encoded, sharded_reference_logps(sft_dir, cfg, encoded)
    ref = load_model(sft_dir, cfg.analysis.dtype)
    device = next(ref.parameters()).device
    with torch.no_grad():
        ref_logps = tuple(torch.cat([sequence_logps(ref, *(encoded[f"{s}_{k}"][i:i + 64].to(device)
                                                           for k in ("ids", "mask", "comp")))
                                     for i in range(0, len(sample), 64)]) for s in ("chosen", "rejected"))
    return encoded, ref_logps


# ------------------------------------------------------------------------------------------------ one checkpoint


def minibatch_alignment(cfg, step: int, folder: Path, dprime, pairs=None):
    """G per mini-batch, component and layer group at one checkpoint (`MinibatchAlignment`)."""
    bar = lambda it: tqdm(it, desc=f"G at step {step}", leave=False, disable=not distributed.is_main())  # noqa: E731
    if uses_sharded_analysis(cfg):
        encoded, ref_logps = pairs
        return sharded_dpo_alignment(folder, cfg, encoded, ref_logps, dprime, step, progress=bar)
    model = load_model(folder, cfg.analysis.dtype)
    method = analysis_method(cfg, model)
    if method == "ghost" and cfg.algo.family == "dpo":
        model.config._attn_implementation = "sdpa"  # reverse mode only: fused attention, no T x T probabilities
    g = dprime_gradient(model, dprime)
    if cfg.algo.family == "ppo":
        from ..trainers.ppo import Rollout
        from ..trainers.ppo_objectives import WEIGHTINGS

        rollout = Rollout.load(folder / "rollout.pt")
        coef = ppo_token_coefficients(rollout, cfg.algo, step, WEIGHTINGS[cfg.algo.weighting])
        return ppo_alignment(model, rollout, g, coef, temperature=cfg.model.ppo.temperature,
                             batch_size=cfg.analysis.ppo_batch_size, progress=bar,
                             all_norms=cfg.analysis.ppo_all_norms)
    encoded, ref_logps = pairs
    log.info("G at step %d: method %s", step, method)
    return dpo_alignment(model, encoded, ref_logps, g, cfg.algo, step, batch_size=cfg.analysis.dpo_batch_size,
                         chunk=cfg.analysis.chunk, progress=bar, method=method)


def loss_check_columns(folder: Path) -> dict:
    """App. A: L on the G sample before and after the update that follows this checkpoint (`loss_check.json`,
    written during training), and whether it rose. Unknown (no file: the final checkpoint, a run trained before the
    check existed) leaves `loss_increased` empty, and such a checkpoint is never excluded."""
    check = read_loss_check(folder)
    if check is None:
        return {"loss_before": None, "loss_after": None, "loss_increased": None}
    return {"loss_before": check["before"], "loss_after": check["after"],
            "loss_increased": bool(check["after"] > check["before"])}


def analyse_checkpoint(cfg, step: int, folder: Path, dprime, pairs=None) -> tuple[list[dict], list[dict]]:
    mb = minibatch_alignment(cfg, step, folder, dprime, pairs)
    s = summarise(mb)
    loss = json.loads((folder / "record.json").read_text()).get("loss")
    kept = ~s["outliers"]
    rows = [{"step": step, "component": comp, "layer_group": group, "G": s["G_filtered"][c, k].item(),
             "G_unfiltered": s["G_unfiltered"][c, k].item(), "n_batches": s["n_batches"],
             "n_outliers": s["n_outliers"], "grad_norm": mb.norms[kept, c].mean().item(), "loss": loss,
             **loss_check_columns(folder), "algo_family": cfg.algo.family, "dprime": cfg.analysis.dprime}
            for c, comp in enumerate(mb.components) for k, group in enumerate(GROUPS)]
    batches = [{"step": step, "batch": b, "component": comp, "grad_norm": mb.norms[b, c].item(),
                "G": mb.G[b, c, 0].item(), "outlier": bool(s["outliers"][b])}
               for b in range(len(s["outliers"])) for c, comp in enumerate(mb.components)]
    return rows, batches


# ------------------------------------------------------------------------------------------------ tables


def append_rows(path: Path, rows: list[dict]) -> pd.DataFrame:
    """Rewrite the table with the new rows atomically: a killed run leaves the previous version, never half.
    Rows of a step already present are replaced (a run killed between the two tables recomputes that step)."""
    new = pd.DataFrame(rows)
    if path.exists():
        old = pd.read_csv(path)
        table = pd.concat([old[~old["step"].isin(new["step"].unique())], new])
    else:
        table = new
    table = table.sort_values(list(table.columns[:3])).reset_index(drop=True)
    tmp = path.with_suffix(".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return table


def done_steps(run_dir: Path) -> set[int]:
    path = run_dir / TABLE
    return set(pd.read_csv(path)["step"].unique().tolist()) if path.exists() else set()


def log_to_wandb(run, rows: list[dict]) -> None:
    if run is None:
        return
    step = rows[0]["step"]
    metrics = {"alignment/step": step}
    for r in rows:
        if r["layer_group"] == "all":
            metrics[f"alignment/G/{r['component']}"] = r["G"]
            metrics[f"alignment/G_unfiltered/{r['component']}"] = r["G_unfiltered"]
        if r["component"] == "TOT":
            metrics[f"alignment/G_layer/{r['layer_group']}"] = r["G"]
    run.log(metrics)


# ------------------------------------------------------------------------------------------------ the stage


def run_alignment(cfg, run_dir: Path, sft_dir: Path, wandb_run=None) -> Path | None:
    """G at every checkpoint not analysed yet; then the figures. Returns the table's path.

    In a multi-process job: every rank together under ZeRO-3 (sharded), else rank 0 while the others wait."""
    if not cfg.analysis.enabled:
        return None
    share_dprime_answers(cfg, run_dir, sft_dir)
    if uses_sharded_analysis(cfg):
        return _run_alignment(cfg, run_dir, sft_dir, wandb_run)
    return distributed.main_first(lambda: _run_alignment(cfg, run_dir, sft_dir, wandb_run))


def _run_alignment(cfg, run_dir: Path, sft_dir: Path, wandb_run=None) -> Path:
    main = distributed.is_main()
    todo = {s: f for s, f in step_dirs(run_dir / "checkpoints").items() if s not in done_steps(run_dir)}
    if todo:
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        batch = cfg.analysis.ppo_batch_size if cfg.algo.family == "ppo" else cfg.analysis.dpo_batch_size
        dprime = dprime_batches(cfg, run_dir, tokenizer, batch)
        pairs = pair_sample(cfg, sft_dir, tokenizer) if cfg.algo.family == "dpo" else None
        if wandb_run is not None:
            wandb_run.define_metric("alignment/*", step_metric="alignment/step")
        checkpoints = tqdm(sorted(todo.items()), desc="gradient alignment (checkpoints)", disable=not main)
        for n, (step, folder) in enumerate(checkpoints):
            rows, batches = analyse_checkpoint(cfg, step, folder, dprime, pairs)
            if not main:
                continue
            append_rows(run_dir / MINIBATCHES, batches)
            append_rows(run_dir / TABLE, rows)  # last: a step is done once it is in the main table
            log_to_wandb(wandb_run, rows)
            log.info("G at step %d: TOT %.3g, POS %.3g, NEG %.3g", step, rows[0]["G"], rows[4]["G"], rows[8]["G"])
            if cfg.debug.kill_after_analysed and n + 1 >= cfg.debug.kill_after_analysed:
                os.kill(os.getpid(), signal.SIGKILL)  # a node failure mid-analysis (resume tests)
    if not main:
        return run_dir / TABLE
    from .plots import draw_figures

    figures = draw_figures(run_dir, exclude_loss_increase=cfg.analysis.exclude_loss_increase)
    if wandb_run is not None and figures:
        import wandb

        wandb_run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
    return run_dir / TABLE
