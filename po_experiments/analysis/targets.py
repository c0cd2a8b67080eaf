"""The sequences G is measured against (`analysis.targets`): D' (the paper's) and four more.

  dprime     D': the held-out (or training, analysis.dprime=train) questions answered greedily by the final model;
  chosen     the first `analysis.n_target` pairs of the G sample (`select_pair_sample`): their training y+;
  rejected   the same pairs' y-;
  sft        the SFT model's greedy answers to the first `n_target` D' questions (generated once from the run's
             start model and cached in analysis/, like D');
  unrelated  each of those questions with the SFT answer to the next one (rotated by one): a fixed response that
             has nothing to do with its prompt.

G_c(target) = E_target[-grad log pi(y|x)]^T grad L_c: the first-order change of the target's mean log-likelihood per
unit step of component c (Eq. 1-3), so chosen / rejected decompose "likelihood displacement" of y+ and y- and sft /
unrelated the "squeezing" of what the model said before training and of off-topic text into positive / negative
learning and weight thirds. The PPO family has no pairs of its own: its chosen / rejected come from the task's
preference pairs (the DPO runs' data) the same way; a task without them skips the two with a logged reason.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import distributed
from ..atomic import write_json
from .gradients import PAPER_TARGET, encode

log = logging.getLogger(__name__)


def wanted_targets(cfg) -> list[str]:
    """`analysis.targets` with D' first (the first target is the paper's G everywhere); D' alone when unset."""
    targets = list(cfg.analysis.get("targets") or [PAPER_TARGET])
    return [PAPER_TARGET] + [t for t in targets if t != PAPER_TARGET]


# ------------------------------------------------------------------------------------------ SFT answers


def sft_key(cfg) -> dict:
    from .stage import dprime_key

    return {**dprime_key(cfg), "n_target": cfg.analysis.n_target, "answers_by": "sft"}


def sft_cache(cfg, run_dir: Path) -> Path:
    from ..cache import config_hash

    return run_dir / "analysis" / f"sft_answers_{config_hash(sft_key(cfg))[:8]}.json"


def needs_sft_answers(cfg) -> bool:
    return bool({"sft", "unrelated"} & set(wanted_targets(cfg)))


def answer_sft(cfg, run_dir: Path, sft_dir: Path, tokenizer) -> list[dict]:
    """The first n_target D' questions answered greedily by the start model (every rank its share); rank 0 caches."""
    from ..generation.backend import shared_generate_texts
    from ..tasks import task_of
    from .stage import dprime_prompts

    prompts = dprime_prompts(cfg, tokenizer)[:cfg.analysis.n_target]
    answers = shared_generate_texts(cfg, sft_dir, prompts, max_new_tokens=cfg.data.max_new_tokens,
                                    desc="SFT answers (G targets)")
    rows = [{"prompt": p, "response": task_of(cfg).dprime_response(a)} for p, a in zip(prompts, answers)]
    if distributed.is_main():
        write_json(sft_cache(cfg, run_dir), rows)
    return rows


def sft_rows(cfg, run_dir: Path, sft_dir: Path, tokenizer) -> list[dict]:
    cache = sft_cache(cfg, run_dir)
    if cache.exists():
        return json.loads(cache.read_text())
    return answer_sft(cfg, run_dir, sft_dir, tokenizer)


def unrelated_rows(rows: list[dict]) -> list[dict]:
    """Each question with the answer to the next one (the last with the first's)."""
    return [{"prompt": r["prompt"], "response": rows[(i + 1) % len(rows)]["response"]} for i, r in enumerate(rows)]


# ------------------------------------------------------------------------------------------ pairs


def pair_texts(cfg, sft_dir: Path, tokenizer):
    """The G sample's pairs (`select_pair_sample`, a datasets.Dataset of prompt / chosen / rejected)."""
    from ..stages.pairs import preference_data
    from .sample import select_pair_sample

    return select_pair_sample(cfg, preference_data(cfg, sft_dir, tokenizer))


def preference_pairs_for_targets(cfg, sft_dir: Path, tokenizer):
    """The first n_target pairs of the G sample, or None (logged) where the task has no preference pairs."""
    try:
        sample = pair_texts(cfg, sft_dir, tokenizer)
    except (OSError, ValueError, KeyError) as err:  # a PPO task whose preference data cannot be had here
        log.warning("G targets chosen / rejected skipped: the task's preference pairs are not available (%s)", err)
        return None
    return sample.select(range(min(cfg.analysis.n_target, len(sample))))


# ------------------------------------------------------------------------------------------ batches


def batched(cfg, tokenizer, rows: list[dict], batch_size: int, *, truncate: bool = False) -> list[tuple]:
    """(ids, mask, completion mask) mini-batches of prompt / response rows, encoded as D' is (`truncate`: cut at
    model.max_length, as DPO trained on its pairs)."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids, mask, comp = encode(tokenizer, [r["prompt"] for r in chunk], [r["response"] for r in chunk])
        if truncate:
            ids, mask, comp = (t[:, :cfg.model.max_length] for t in (ids, mask, comp))
        out.append((ids, mask, comp))
    return out


def target_rows(cfg, run_dir: Path, sft_dir: Path, tokenizer, dprime_rows_: list[dict]) -> dict[str, list[dict]]:
    """{target: prompt / response rows} for every wanted target that can be had (D' first)."""
    wanted = wanted_targets(cfg)
    rows = {PAPER_TARGET: dprime_rows_}
    if {"chosen", "rejected"} & set(wanted):
        pairs = preference_pairs_for_targets(cfg, sft_dir, tokenizer)
        if pairs is not None:
            for side in ("chosen", "rejected"):
                rows[side] = [{"prompt": p, "response": r} for p, r in zip(pairs["prompt"], pairs[side])]
    if needs_sft_answers(cfg):
        sft = distributed.main_first(lambda: sft_rows(cfg, run_dir, sft_dir, tokenizer))
        rows["sft"] = sft
        if len(sft) < 2:
            log.warning("G target unrelated skipped: it needs at least 2 questions, analysis.n_target=%d",
                        cfg.analysis.n_target)
        else:
            rows["unrelated"] = unrelated_rows(sft)
    return {t: rows[t] for t in wanted if t in rows}


def target_batches(cfg, run_dir: Path, sft_dir: Path, tokenizer, batch_size: int) -> dict[str, list[tuple]]:
    """{target: mini-batches} in `wanted_targets` order, D' first."""
    from .stage import dprime_rows

    dprime = distributed.main_first(lambda: dprime_rows(cfg, run_dir, tokenizer))
    rows = target_rows(cfg, run_dir, sft_dir, tokenizer, dprime)
    return {t: batched(cfg, tokenizer, r, batch_size, truncate=t in ("chosen", "rejected")) for t, r in rows.items()}


def share_sft_answers(cfg, run_dir: Path, sft_dir: Path, pending: bool) -> None:
    """A multi-process job: every rank answers its share of the SFT target's questions before rank 0 analyses."""
    from transformers import AutoTokenizer

    if distributed.world() == 1 or not needs_sft_answers(cfg):
        return
    if distributed.broadcast(distributed.is_main() and pending and not sft_cache(cfg, run_dir).exists()):
        answer_sft(cfg, run_dir, sft_dir, AutoTokenizer.from_pretrained(sft_dir))
