"""Rehearse the paper's real-data path at a real architecture's shape, offline, on CPU: `model=pythia` pointed at a
random-weight GPTNeoX of Pythia-160M's shape (12 layers, hidden 768, vocabulary 50,304), data files in the hub
schemas built from ../shared/data (HH-RLHF dialogues as UltraChat / UltraFeedback rows, AlpacaEval's instructions),
and a classifier reward model. Runs cDPO (the step check, the App. A loss check, G by the ghost method) and PPO
(G on a fresh sample from every checkpoint) through run.py, and prints each run's length, loss checks and times.

    python scripts/rehearse_paper_path.py /tmp/rehearsal            # about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
ALPACA = REPO.parent / "shared" / "data" / "alpaca_eval_805_instructions.json"
PYTHIA_160M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   vocab_size=50304, max_position_embeddings=2048)


def turns(dialogue: str) -> list[dict]:
    """An HH-RLHF dialogue string -> chat messages."""
    out = []
    for part in dialogue.split("\n\n")[1:]:
        role, _, text = part.partition(": ")
        out.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    return out


def build(root: Path, rows: int) -> None:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    sys.path.insert(0, str(REPO))
    from po_experiments.models import DEFAULT_CHAT_TEMPLATE, build_word_tokenizer

    data = [json.loads(line) for line in gzip.open(HH, "rt")][:rows]
    words = Counter(w for d in data for w in (d["chosen"] + d["rejected"]).split())
    tok = build_word_tokenizer([w for w, _ in words.most_common(20000)])
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_160M, **ids, tie_word_embeddings=False)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rm_shape = {**PYTHIA_160M, "num_hidden_layers": 2}  # the reward model only scores: 2 layers keep it quick
    GPTNeoXForSequenceClassification(GPTNeoXConfig(**rm_shape, **ids, num_labels=1)).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    with open(root / "ultrachat.jsonl", "w") as f:
        for d in data:
            f.write(json.dumps({"messages": turns(d["chosen"])}) + "\n")
    with open(root / "ultrafeedback.jsonl", "w") as f:
        for d in data:
            chosen, rejected = turns(d["chosen"]), turns(d["rejected"])
            if len(chosen) < 2 or chosen[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1] \
                    or chosen == rejected or not chosen[-1]["content"] or not rejected[-1]["content"]:
                continue
            f.write(json.dumps({"prompt": chosen[-2]["content"], "chosen": chosen, "rejected": rejected,
                                "score_chosen": 8.0, "score_rejected": 2.0}) + "\n")


def run(root: Path, name: str, *overrides: str) -> dict:
    args = [f"model.path={root / 'base'}", "model.dtype=float32", "model.max_length=256",
            "model.activation_checkpointing=true", f"data.sft.path={root / 'ultrachat.jsonl'}",
            f"data.preferences.path={root / 'ultrafeedback.jsonl'}", f"data.questions.path={HH}",
            f"data.instructions.path={ALPACA}", "data.max_new_tokens=16", "eval.judge=reward_model",
            f"eval.reward_model.path={root / 'rm'}", "eval.n_prompts=8", "analysis.n_dprime=8", "logger=none",
            f"paths.cache_dir={root / 'cache'}", "model.sft.batch_size=8", "model.sft.max_steps=4",
            f"hydra.run.dir={root / name}"]
    started = time.time()
    proc = subprocess.run([sys.executable, "run.py", "model=pythia", *args, *overrides], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((root / name / "summary.json").read_text())
    checks = {p.parent.name: json.loads(p.read_text()) for p in (root / name / "checkpoints").glob("*/loss_check.json")}
    return {"run": name, "seconds": round(time.time() - started, 1), "steps": summary["run_length"]["steps"],
            "unit": summary["step_unit"], "win_rate": summary["win_rate"],
            "loss_checks": {k: (round(v["before"], 5), round(v["after"], 5)) for k, v in sorted(checks.items())}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--rows", type=int, default=96, help="HH-RLHF dialogues turned into SFT rows and pairs")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    if not (args.root / "base").exists():
        build(args.root, args.rows)
    results = [
        run(args.root, "cdpo", "algo=cdpo", "algo.t1=2", "algo.t2=8", "model.dpo.batch_size=8",
            "model.dpo.epochs=1", "model.dpo.save_steps=3", "model.dpo.logging_steps=1", "analysis.n_pairs=8",
            "analysis.enabled=true"),
        run(args.root, "ppo", "algo=ppo", f"reward.path={args.root / 'rm'}", "reward.dtype=float32",
            "model.ppo.batch_size=4", "model.ppo.max_steps=4", "model.ppo.save_steps=2", "model.ppo.logging_steps=1",
            "model.ppo.max_new_tokens=16", "model.ppo.max_prompt_length=128", "analysis.n_pairs=12",
            "analysis.enabled=true"),
    ]
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
