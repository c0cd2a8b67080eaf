"""Win rate of the trained policy against the SFT model: greedy outputs on held-out prompts, judged pairwise.

Outputs are written as AlpacaEval records ({instruction, output, generator, dataset}) under `outputs/`, with one
verdict per prompt in `outputs/verdicts.json`; a tie counts one half (AlpacaEval's convention).
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from ..data.synthetic import DictionaryTask
from ..models import load_for_inference
from .common import generate

log = logging.getLogger(__name__)


@dataclass
class EvalPrompts:
    instructions: list[str]  # what a reader sees (AlpacaEval's `instruction`)
    model_inputs: list[str]  # what the model is fed (chat-templated for real models)
    dataset: list[str]
    max_new_tokens: int


def eval_prompts(cfg, tokenizer) -> EvalPrompts:
    n = cfg.eval.n_prompts
    if cfg.data.name == "synthetic":
        prompts = DictionaryTask.from_config(cfg.data).heldout_prompts(cfg.data.n_heldout)[:n]
        return EvalPrompts(prompts, prompts, ["synthetic-heldout"] * len(prompts), cfg.data.max_new_tokens)
    from ..data.paper import load_instructions

    rows = load_instructions(cfg.data)
    rows = rows.select(range(min(n, len(rows)))) if n else rows
    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": i}], tokenize=False,
                                            add_generation_prompt=True) for i in rows["instruction"]]
    return EvalPrompts(list(rows["instruction"]), inputs, list(rows["dataset"]), cfg.data.max_new_tokens)


def judge_gold(cfg, prompts: EvalPrompts, reference: list[str], candidate: list[str]) -> list[dict]:
    task = DictionaryTask.from_config(cfg.data)
    verdicts = []
    for prompt, ref, cand in zip(prompts.model_inputs, reference, candidate):
        r_ref, r_cand = task.gold_reward(prompt, ref), task.gold_reward(prompt, cand)
        score = 1.0 if r_cand > r_ref else 0.5 if r_cand == r_ref else 0.0
        verdicts.append({"instruction": prompt, "output_1": ref, "output_2": cand, "reward_1": r_ref,
                         "reward_2": r_cand, "preference": 1.0 + score})  # AlpacaEval: 1 (ref), 1.5 (tie), 2
    return verdicts


def win_rate(verdicts: list[dict]) -> tuple[float, float]:
    """Percentage of prompts where the candidate wins (ties one half), and its standard error."""
    scores = [v["preference"] - 1.0 for v in verdicts]
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    return 100.0 * mean, 100.0 * math.sqrt(var / n)


def _write_outputs(path: Path, prompts: EvalPrompts, outputs: list[str], generator: str) -> None:
    records = [{"instruction": i, "output": o, "generator": generator, "dataset": d}
               for i, o, d in zip(prompts.instructions, outputs, prompts.dataset)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))


def greedy_outputs(model_dir: Path, prompts: EvalPrompts, cfg, desc: str) -> list[str]:
    model, tokenizer = load_for_inference(model_dir, cfg.model.dtype)
    return generate(model, tokenizer, prompts.model_inputs, max_new_tokens=prompts.max_new_tokens,
                    batch_size=cfg.eval.batch_size, desc=desc)


def evaluate(cfg, sft_dir: Path, policy_dir: Path, step: int, run_dir: Path) -> dict:
    prompts = eval_prompts(cfg, AutoTokenizer.from_pretrained(sft_dir))
    names = {"reference": f"sft-{cfg.model.name}", "policy": f"{cfg.algo.name}-{cfg.model.name}-seed{cfg.seed}"}
    reference = greedy_outputs(sft_dir, prompts, cfg, "SFT greedy outputs")
    candidate = greedy_outputs(policy_dir, prompts, cfg, "policy greedy outputs")
    _write_outputs(run_dir / "outputs" / "reference.json", prompts, reference, names["reference"])
    _write_outputs(run_dir / "outputs" / "policy.json", prompts, candidate, names["policy"])

    judge = cfg.eval.judge.value if hasattr(cfg.eval.judge, "value") else str(cfg.eval.judge)
    if judge == "auto":
        judge = "gold" if cfg.data.name == "synthetic" else "none"
    if judge == "none":
        log.info("eval.judge=none: outputs written to %s, no win rate", run_dir / "outputs")
        return {"win_rate": None, "win_rate_se": None, "n": len(candidate), "judge": "none"}

    verdicts = judge_gold(cfg, prompts, reference, candidate)
    (run_dir / "outputs" / "verdicts.json").write_text(json.dumps(verdicts, indent=1))
    rate, se = win_rate(verdicts)
    with open(run_dir / "win_rate.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "win_rate", "win_rate_se", "n", "judge"])
        writer.writerow([step, f"{rate:.4f}", f"{se:.4f}", len(verdicts), judge])
    mean_gold = sum(v["reward_2"] for v in verdicts) / len(verdicts)
    mean_gold_ref = sum(v["reward_1"] for v in verdicts) / len(verdicts)
    log.info("win rate vs SFT: %.2f ± %.2f (n=%d, judge=%s); mean gold %.3f (SFT %.3f)", rate, se, len(verdicts),
             judge, mean_gold, mean_gold_ref)
    return {"win_rate": rate, "win_rate_se": se, "n": len(verdicts), "judge": judge,
            "gold_policy": mean_gold, "gold_reference": mean_gold_ref}
