"""The paper's real-data path end to end, offline: `model=pythia` pointed at a local model folder and local
files in the exact hub schemas (UltraChat, UltraFeedback, HH-RLHF, AlpacaEval), for DPO and for PPO with a
classifier reward model. What runs on a GPU cluster with the hub is this code with other paths and sizes."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import GPTNeoXForSequenceClassification

from po_experiments.models import DEFAULT_CHAT_TEMPLATE, build_tiny_model, build_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory, task):
    """A 'base model' and a 'reward model' folder with a chat template, and the four data sets as local files."""
    root = tmp_path_factory.mktemp("real")
    tok = build_word_tokenizer(task.words)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    arch = OmegaConf.create({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                             "intermediate_size": 64, "max_position_embeddings": 128})
    base = build_tiny_model(arch, tok, 0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rm = GPTNeoXForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 1,
                                                                   "id2label": None, "label2id": None}))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")

    rng = random.Random(0)

    def words(k, prefix="s"):
        return " ".join(f"{prefix}{rng.randrange(16)}" for _ in range(k))

    def turn(role, content):
        return {"role": role, "content": content}

    with open(root / "ultrachat.jsonl", "w") as f:
        for _ in range(64):
            u = words(4)
            f.write(json.dumps({"messages": [turn("user", u), turn("assistant", u.replace("s", "t"))]}) + "\n")
    with open(root / "ultrafeedback.jsonl", "w") as f:
        for _ in range(48):
            u = words(4)
            f.write(json.dumps({"prompt": u, "chosen": [turn("user", u), turn("assistant", u.replace("s", "t"))],
                                "rejected": [turn("user", u), turn("assistant", words(3, "t"))],
                                "score_chosen": 8.0, "score_rejected": 2.0}) + "\n")
    with open(root / "hh.jsonl", "w") as f:
        for _ in range(16):
            u = words(5)
            f.write(json.dumps({"chosen": f"\n\nHuman: {u}\n\nAssistant: {u.replace('s', 't')}",
                                "rejected": f"\n\nHuman: {u}\n\nAssistant: t1"}) + "\n")
    (root / "alpaca.json").write_text(json.dumps([{"instruction": words(5), "dataset": "test"} for _ in range(12)]))
    return root


def run_real(root: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [f"model.path={root / 'base'}", "model.dtype=float32", "model.max_length=64", "model.sft.batch_size=16",
            "model.sft.max_steps=4", f"data.sft.path={root / 'ultrachat.jsonl'}",
            f"data.preferences.path={root / 'ultrafeedback.jsonl'}", f"data.questions.path={root / 'hh.jsonl'}",
            f"data.instructions.path={root / 'alpaca.json'}", "data.max_new_tokens=8", "analysis.n_pairs=16",
            "analysis.n_dprime=8", "logger=none", "runtime.threads=1", f"paths.cache_dir={root / 'cache'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run.py", "model=pythia", *args, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def check_common(run_dir: Path, algo: str, judge: str = "none") -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == algo and summary["data"] == "paper" and summary["judge"] == judge
    assert (summary["win_rate"] is None) == (judge == "none") and summary["final_step"] > 0
    records = json.loads((run_dir / "eval" / "outputs" / f"step-{summary['final_step']}.json").read_text())
    assert len(records) == 12 and set(records[0]) == {"instruction", "output", "generator", "dataset", "index"}
    dprime = json.loads((run_dir / "analysis" / "dprime_heldout.json").read_text())
    assert len(dprime) == 8 and all(r["prompt"].startswith("<|user|>") for r in dprime)  # HH questions, templated
    table = (run_dir / "alignment.csv").read_text().splitlines()
    assert len(table) > 1 + 24  # at least two checkpoints x 6 components x 4 groups
    return summary


def test_dpo_on_the_paper_data_schemas(local_copies, tmp_path):
    """DPO on real-data schemas, judged at every checkpoint by a (chat-template) reward model."""
    run_dir = tmp_path / "dpo"
    run_real(local_copies, run_dir, "model.dpo.batch_size=8", "model.dpo.save_steps=2", "model.dpo.logging_steps=1",
             "model.dpo.epochs=1", "eval.judge=reward_model", f"eval.reward_model.path={local_copies / 'rm'}")
    summary = check_common(run_dir, "dpo", judge="reward_model-rm")
    verdicts = json.loads((run_dir / "eval" / "reward_model-rm" / f"step-{summary['final_step']}.json").read_text())
    assert len(verdicts) == 12 and all(v["preference"] in (1.0, 1.5, 2.0) for v in verdicts)


def test_ppo_with_a_classifier_reward_model(local_copies, tmp_path):
    run_dir = tmp_path / "ppo"
    proc = run_real(local_copies, run_dir, "algo=ppo", f"reward.path={local_copies / 'rm'}",
                    "reward.trust_remote_code=false", "reward.dtype=float32", "model.ppo.batch_size=8",
                    "model.ppo.max_new_tokens=8", "model.ppo.save_steps=2", "model.ppo.logging_steps=1",
                    "model.ppo.max_prompt_length=64")
    check_common(run_dir, "ppo")
    assert "no user turns were given" not in proc.stdout + proc.stderr  # the RM read UltraFeedback's user turns
    assert (run_dir / "checkpoints" / "step-2" / "rollout.pt").exists()
