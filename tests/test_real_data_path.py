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
        for i in range(64):
            u = words(4)
            answer = words(80, "t") if i == 5 else u.replace("s", "t")  # row 5: over max_length 64, truncated
            f.write(json.dumps({"messages": [turn("user", u), turn("assistant", answer)]}) + "\n")
    with open(root / "ultrafeedback.jsonl", "w") as f:
        for i in range(48):
            u = words(4)
            f.write(json.dumps({"prompt": u, "chosen": [turn("user", u), turn("assistant", u.replace("s", "t"))],
                                "rejected": [turn("user", u), turn("assistant", words(80 if i == 3 else 3, "t"))],
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
    if not any(o.startswith("eval.judge=") for o in overrides):
        args.append("eval.judge=none")  # no judge runs here; only an explicit none runs without one
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
    dprime = json.loads(next((run_dir / "analysis").glob("dprime_heldout_*.json")).read_text())
    assert len(dprime) == 8 and all(r["prompt"].startswith("<|user|>") for r in dprime)  # HH questions, templated
    table = (run_dir / "alignment.csv").read_text().splitlines()
    assert len(table) > 1 + 24  # at least two checkpoints x 6 components x 4 groups
    return summary


@pytest.mark.slow
def test_dpo_on_the_paper_data_schemas(local_copies, tmp_path):
    """DPO on real-data schemas, judged at every checkpoint by a (chat-template) reward model; rows longer than
    max_length are kept (TRL truncates them) and their share is logged."""
    run_dir = tmp_path / "dpo"
    proc = run_real(local_copies, run_dir, "model.dpo.batch_size=8", "model.dpo.save_steps=2",
                    "model.dpo.logging_steps=1", "model.dpo.epochs=1", "eval.judge=reward_model",
                    f"eval.reward_model.path={local_copies / 'rm'}")
    summary = check_common(run_dir, "dpo", judge="reward_model-rm")
    log = proc.stdout + proc.stderr
    sft_metrics = json.loads((Path(summary["sft_dir"]) / "sft_metrics.json").read_text())
    assert sft_metrics["examples"] == 64  # the long dialogue was kept (SFTTrainer truncated it), not dropped
    assert "1 of 48 rows (2.1 %) are longer than max_length and will be truncated" in log  # the long pair
    assert "dropped 1 of 48" not in log
    verdicts = json.loads((run_dir / "eval" / "reward_model-rm" / f"step-{summary['final_step']}.json").read_text())
    assert len(verdicts) == 12 and all(v["preference"] in (1.0, 1.5, 2.0) for v in verdicts)


@pytest.mark.slow
def test_a_step_setting_past_the_rows_loaded_stops_before_training(local_copies, tmp_path):
    """Planned from UltraFeedback's 61,135 pairs, cDPO's t1 = 20 fits; the 48-pair local copy gives 12 steps: the
    run stops when training starts, naming the key, with nothing trained."""
    run_dir = tmp_path / "cdpo"
    with pytest.raises(AssertionError, match=r"algo\.t1=20 lies outside the run.*the training data: 12 steps"):
        run_real(local_copies, run_dir, "algo=cdpo", "algo.t1=20", "algo.t2=22", "model.dpo.batch_size=8")
    assert not list(run_dir.glob("checkpoints/step-*")) and not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_ppo_with_a_classifier_reward_model(local_copies, tmp_path):
    run_dir = tmp_path / "ppo"
    proc = run_real(local_copies, run_dir, "algo=ppo", f"reward.path={local_copies / 'rm'}",
                    "reward.trust_remote_code=false", "reward.dtype=float32", "model.ppo.batch_size=8",
                    "model.ppo.max_new_tokens=8", "model.ppo.save_steps=2", "model.ppo.logging_steps=1",
                    "model.ppo.max_prompt_length=64")
    check_common(run_dir, "ppo")
    assert "no user turns were given" not in proc.stdout + proc.stderr  # the RM read UltraFeedback's user turns
    assert (run_dir / "checkpoints" / "step-2" / "rollout.pt").exists()



@pytest.mark.slow
@pytest.mark.parametrize("override, named", [
    ("data.questions.path={root}/nowhere.jsonl", "nowhere.jsonl"),
    ("data.instructions.path=null", "data.instructions.path=/path/to/alpaca_eval.json"),  # the hub's script repo
])
def test_run_stops_at_preflight_on_an_unreadable_data_source(local_copies, tmp_path, override, named):
    """Before SFT: exit 2 with one line naming the key and file, within the seconds of the imports."""
    import time

    args = [f"model.path={local_copies / 'base'}", f"data.sft.path={local_copies / 'ultrachat.jsonl'}",
            f"data.preferences.path={local_copies / 'ultrafeedback.jsonl'}",
            f"data.questions.path={local_copies / 'hh.jsonl'}", f"data.instructions.path={local_copies / 'alpaca.json'}",
            override.format(root=tmp_path), "eval.judge=none", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "run.py", "model=pythia", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 90  # imports on a busy machine; no data set was loaded
    assert not (tmp_path / "cache" / "sft").exists()

# --------------------------------------------------------------------------------------------- chat formats
# Tokenizers and templates built here, shaped like Llama-3's (a distinct <|begin_of_text|> BOS that the tokenizer
# also adds to plain text, <|eot_id|>, <|start_header_id|>) and Qwen3's (<|im_start|>, no BOS, a template that
# honours enable_thinking). Every stage's sequences are checked through the functions the stages call.

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|user|>", "<|assistant|>", "<|system|>", "[PAD]", "[UNK]"]
QWEN3_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "[UNK]"]
WORDS = [f"w{i}" for i in range(40)] + ["user", "assistant", "system", "Human:", "Assistant:"]
# Llama-3-Instruct's template (it writes BOS itself), and the same without BOS
LLAMA3_INSTRUCT = ("{% for m in messages %}{% set content = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                   " + m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
                   "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_NO_BOS = LLAMA3_INSTRUCT.replace("{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}",
                                        "")
# Qwen3's logic for the non-thinking case: the final answer carries an empty think block; the generation prompt
# carries it only with enable_thinking=false.
QWEN3_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
                  "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
                  "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                  "{% endif %}")


def build_tokenizer(specials: list[str], **tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = tokens.get("bos_token")
    if bos:  # like Llama-3's tokenizer: plain text gets BOS in front (add_special_tokens=True)
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                   additional_special_tokens=[t for t in specials if t not in tokens.values()],
                                   **tokens)


def saved_base(tmp_path, tok, template) -> Path:
    """A base model folder's tokenizer (no template = a base model such as Llama-3-8B)."""
    tok.chat_template = template
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def tokenizer_of_sft_model(tmp_path, base: Path, **template_kwargs):
    """The SFT stage's tokenizer (load_tokenizer), saved next to the SFT model and read back, as every later
    stage reads it; both returned."""
    from transformers import AutoTokenizer

    from po_experiments.models import load_tokenizer

    cfg = OmegaConf.create({"trust_remote_code": False, "chat_template_kwargs": template_kwargs})
    sft_tok = load_tokenizer(cfg, str(base))
    sft_tok.save_pretrained(tmp_path / "sft")
    return sft_tok, AutoTokenizer.from_pretrained(tmp_path / "sft")


def write_paper_files(root: Path) -> dict:
    def turn(role, content):
        return {"role": role, "content": content}

    root.mkdir(parents=True, exist_ok=True)
    (root / "sft.jsonl").write_text("".join(json.dumps({"messages": [turn("user", f"w{i} w1"), turn(
        "assistant", f"w{i + 1} w2")]}) + "\n" for i in range(4)))
    prefs = [{"prompt": f"w{i}", "chosen": [turn("user", f"w{i}"), turn("assistant", "w3 w4")],
              "rejected": [turn("user", f"w{i}"), turn("assistant", "w5")]} for i in range(4)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (root / "hh.jsonl").write_text("".join(json.dumps({"chosen": f"\n\nHuman: w{i}\n\nAssistant: w1\n\nHuman: w2"
                                                                 f"\n\nAssistant: w3", "rejected": "x"}) + "\n"
                                           for i in range(4)))
    (root / "alpaca.json").write_text(json.dumps([{"instruction": f"w{i} w7", "dataset": "t"} for i in range(4)]))
    return {"sft": root / "sft.jsonl", "preferences": root / "prefs.jsonl", "questions": root / "hh.jsonl",
            "instructions": root / "alpaca.json"}


def stage_cfg(files: dict):
    from po_experiments.config import PaperDataConfig, SourceConfig

    data = PaperDataConfig(max_length=64, **{w: SourceConfig(path=str(p)) for w, p in files.items()})
    return OmegaConf.create({"data": OmegaConf.structured(data), "seed": 0,
                             "eval": {"n_prompts": 0, "max_new_tokens": 8},
                             "model": {"max_length": 64, "ppo": {"max_prompt_length": 64}},
                             "analysis": {"n_dprime": 4, "dprime": "heldout"}})


def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def trl_tokenized(tmp_path, tok, files):
    """What TRL's SFTTrainer and DPOTrainer train on: input ids of SFT rows, prompt/chosen/rejected ids of pairs."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from po_experiments.data.paper import load_preferences, load_sft

    data = stage_cfg(files).data
    common = dict(max_length=64, report_to=[], use_cpu=True, bf16=False, dataset_num_proc=None)
    sft = SFTTrainer(model=tiny_llama(tok), processing_class=tok, train_dataset=load_sft(data, tok),
                     args=SFTConfig(output_dir=str(tmp_path / "sft_t"), **common))
    dpo = DPOTrainer(model=tiny_llama(tok), ref_model=tiny_llama(tok), processing_class=tok,
                     train_dataset=load_preferences(data, tok).select_columns(["prompt", "chosen", "rejected"]),
                     args=DPOConfig(output_dir=str(tmp_path / "dpo_t"), precompute_ref_log_probs=False, **common))
    return sft.train_dataset, dpo.train_dataset


def every_stage_ids(tmp_path, tok, files) -> dict[str, list[list[int]]]:
    """Token ids of every chat-formatted sequence each stage builds, as the stage builds it."""
    from po_experiments.analysis.gradients import encode_pairs
    from po_experiments.analysis.stage import dprime_prompts
    from po_experiments.data.paper import load_preferences
    from po_experiments.evaluation.stage import eval_prompts
    from po_experiments.rewards import ClassifierReward
    from po_experiments.tasks import prompt_dataset

    cfg = stage_cfg(files)
    sft, dpo = trl_tokenized(tmp_path, tok, files)
    as_generated = lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731 (generate)
    pairs = load_preferences(cfg.data, tok)
    encoded = encode_pairs(tok, pairs)
    reward = ClassifierReward.__new__(ClassifierReward)  # its formatting only: the RM reads its own template
    reward.tokenizer, reward.messages, reward._warned, reward.name = tok, None, False, "rm"
    return {
        "sft": list(sft["input_ids"]),
        "dpo chosen": [p + c for p, c in zip(dpo["prompt_ids"], dpo["chosen_ids"])],
        "dpo rejected": [p + r for p, r in zip(dpo["prompt_ids"], dpo["rejected_ids"])],
        "evaluation": as_generated(eval_prompts(cfg, tok).model_inputs),
        "ppo": list(prompt_dataset(cfg, tok)[0]["input_ids"]),
        "dprime": as_generated(dprime_prompts(cfg, tok)),
        "G pairs": [row[mask.bool()].tolist() for row, mask in zip(encoded["chosen_ids"], encoded["chosen_mask"])],
        "reward model": reward.encode(["q"] * 4, ["w1"] * 4, messages=list(pairs["prompt"])),
    }


@pytest.mark.parametrize("template", [None, LLAMA3_NO_BOS, LLAMA3_INSTRUCT], ids=["base", "no-bos", "instruct"])
def test_llama3_bos_starts_every_stage_sequence_once(tmp_path, template):
    base = build_tokenizer(LLAMA3_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                           pad_token="[PAD]")
    assert base("w1 w2")["input_ids"][0] == base.bos_token_id  # the tokenizer adds BOS to plain text, as Llama-3's
    _, tok = tokenizer_of_sft_model(tmp_path, saved_base(tmp_path, base, template))
    for stage, seqs in every_stage_ids(tmp_path, tok, write_paper_files(tmp_path / "data")).items():
        assert len(seqs) == 4, stage
        for ids in seqs:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (stage, tok.decode(ids))


def test_pythia_and_the_tiny_model_keep_their_template_and_ids(task):
    """BOS == EOS (Pythia's <|endoftext|>, the tiny model's <eos>): no BOS is added, the ids stay as they were."""
    from po_experiments.models import chat_template_ids, fix_chat_template

    tok = build_word_tokenizer(task.words)
    assert tok.bos_token == tok.eos_token
    before = tok.apply_chat_template([{"role": "user", "content": task.words[0]}], chat_template=DEFAULT_CHAT_TEMPLATE,
                                     add_generation_prompt=True, return_dict=False)
    fix_chat_template(tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert chat_template_ids(tok, [{"role": "user", "content": task.words[0]}], add_generation_prompt=True) == before
    assert getattr(build_word_tokenizer(task.words), "chat_template", None) is None  # the embedded task: no template


def test_a_template_is_fixed_once(tmp_path):
    """Loading the SFT model's tokenizer again (or fixing it twice) adds neither a second BOS nor a second header."""
    from po_experiments.models import chat_template_ids, fix_chat_template

    base = build_tokenizer(LLAMA3_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                           pad_token="[PAD]")
    _, tok = tokenizer_of_sft_model(tmp_path, saved_base(tmp_path, base, LLAMA3_NO_BOS), enable_thinking=False)
    once = tok.chat_template
    assert fix_chat_template(tok, {"enable_thinking": False}).chat_template == once
    assert chat_template_ids(tok, [{"role": "user", "content": "w1"}]).count(tok.bos_token_id) == 1


def qwen3_tokenizer(tmp_path, **template_kwargs):
    base = build_tokenizer(QWEN3_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert base.bos_token is None  # as Qwen3's
    return tokenizer_of_sft_model(tmp_path, saved_base(tmp_path, base, QWEN3_TEMPLATE), **template_kwargs)


def test_qwen3_thinking_off_in_every_stage(tmp_path):
    """model.chat_template_kwargs={enable_thinking: false}: every generation prompt (evaluation, PPO, D', the DPO
    prompt) ends with the empty think block that SFT and DPO targets carry, so targets and prompts agree."""
    sft_tok, tok = qwen3_tokenizer(tmp_path, enable_thinking=False)
    think = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    start = tok("<|im_start|> assistant", add_special_tokens=False)["input_ids"]
    seqs = every_stage_ids(tmp_path, tok, write_paper_files(tmp_path / "data"))
    for stage in ("evaluation", "ppo", "dprime"):
        for ids in seqs[stage]:
            assert ids[-len(start + think):] == start + think, (stage, tok.decode(ids))
    _, dpo = trl_tokenized(tmp_path, tok, write_paper_files(tmp_path / "data"))
    for prompt, chosen in zip(dpo["prompt_ids"], dpo["chosen_ids"]):
        assert prompt[-len(think):] == think and think[0] not in chosen  # the tags are prompt, not response
    for ids in seqs["sft"]:
        assert ids.count(think[0]) == 1 and ids[ids.index(think[0]) - len(start):ids.index(think[0])] == start
    assert sft_tok.chat_template == tok.chat_template  # the choice travels with the SFT model's tokenizer
    forced_on = tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=True)
    assert forced_on.endswith("<think>\n\n</think>\n\n")  # one choice: a render-time kwarg cannot undo it


def test_qwen3_without_the_choice_prompts_and_targets_disagree(tmp_path):
    """The default render (no kwarg): the generation prompt stops at `assistant\\n` while every target starts with
    the think block, the mismatch that model.chat_template_kwargs removes."""
    from po_experiments.analysis.stage import dprime_prompts

    _, tok = qwen3_tokenizer(tmp_path)
    prompts = dprime_prompts(stage_cfg(write_paper_files(tmp_path / "data")), tok)
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)


def test_chat_template_kwargs_in_the_qwen3_config_and_checked():
    """Qwen3's choice is config, part of its SFT cache key; other models' keys (and cached SFT models) unchanged."""
    from hydra import compose, initialize_config_dir

    from po_experiments.config import validate
    from po_experiments.stages.sft import sft_key

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        qwen3 = compose("config", overrides=["model=qwen3"])
        pythia = compose("config", overrides=["model=pythia", "data.num_proc=4"])
        bad = compose("config", overrides=["model=qwen3", "model.chat_template_kwargs={enable_thinking: [1]}"])
    assert qwen3.model.chat_template_kwargs == {"enable_thinking": False}
    assert sft_key(qwen3)["model"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in sft_key(pythia)["model"] and "num_proc" not in sft_key(pythia)["data"]
    assert sft_key(pythia)["data"]["max_length"] == pythia.model.max_length == 1024  # what TRL truncates to
    with pytest.raises(Exception, match="model.chat_template_kwargs.enable_thinking"):
        validate(bad)
