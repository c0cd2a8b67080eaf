"""The native ArmoRM (no remote code) on a tiny checkpoint in the published layout that the test builds: strict
loading through the config path, the score against an independent computation from the raw state dict, its
errors, the pad checks for Llama-3-style reward models, the reward-model judge, PPO with it, and the preflight
that reads only config.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from po_experiments.errors import ModelUnavailableError
from po_experiments.reward_models.armorm import (PUBLISHED_GATING_PATTERN, ArmoRMForScoring, gating_positions,
                                                 last_real_positions)
from po_experiments.reward_models.architecture import check_reward_model
from po_experiments.rewards import ClassifierReward, build_reward, preflight_reward

from test_rewards import make_cfg

REPO = Path(__file__).resolve().parents[1]
N_OBJECTIVES, GATING_HIDDEN, GATING_LAYERS, TEMPERATURE = 5, 12, 2, 10.0
HIDDEN = 16
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>"]
TURNS = [[{"role": "user", "content": "s3 s1"}],
         [{"role": "user", "content": "s1 s2"}, {"role": "assistant", "content": "t1 t2"},  # two prompt ends:
          {"role": "user", "content": "s3 s4 s5"}],  # the gating reads the last one
         [{"role": "user", "content": "s9"}]]
RESPONSES = ["t3 t1", "t1 t2 t3 t4 t5 t5 t6", "t9"]


def llama3_tokenizer(words: list[str], *, spare_pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level stand-in for Llama-3's tokenizer: its chat specials, `user`/`assistant` as plain words, and
    `\\n\\n` as one token, so ArmoRM's end-of-prompt pattern is five tokens as in the real vocabulary."""
    specials = SPECIALS if spare_pad else SPECIALS[:-1]
    vocab = {w: i for i, w in enumerate(["<unk>", "user", "assistant", "system", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_tokens([AddedToken("\n\n", special=False, normalized=False)])
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>" if spare_pad else None)
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def published_state_dict(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """ArmoRM's published keys, drawn at random: the backbone as `model.*`, the regression layer, the reward
    transform (not the identity), the gating MLP and its logit scale. No lm_head, no score."""
    torch.manual_seed(seed)
    state = {f"model.{k}": v for k, v in LlamaModel(config).state_dict().items()}
    for k, v in state.items():  # LlamaModel's init leaves the norms at 1: draw them too, so the test sees them
        if k.endswith("norm.weight"):
            state[k] = 1 + 0.1 * torch.randn_like(v)
    state["model.embed_tokens.weight"] = 0.02 * torch.randn_like(state["model.embed_tokens.weight"])  # no zero pad row
    state["regression_layer.weight"] = torch.randn(N_OBJECTIVES, HIDDEN)
    state["reward_transform_matrix"] = torch.eye(N_OBJECTIVES) + 0.3 * torch.randn(N_OBJECTIVES, N_OBJECTIVES)
    sizes = [HIDDEN] + [GATING_HIDDEN] * GATING_LAYERS + [N_OBJECTIVES]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        state[f"gating.layers.{i}.weight"] = torch.randn(b, a) / a ** 0.5
        state[f"gating.layers.{i}.bias"] = 0.1 * torch.randn(b)
    state["gating.logit_scale"] = torch.tensor([1.7])
    return {k: v.contiguous() for k, v in state.items()}


def save_tiny_armorm(folder: Path, words: list[str], *, pad_id: str | None = "spare", spare_pad: bool = True,
                     edit=None) -> Path:
    """A tiny checkpoint in ArmoRM's published layout: config.json naming LlamaForRewardModelWithGating (with the
    published remote-code `auto_map`, which must be ignored), model.safetensors with exactly the published keys,
    a Llama-3-style tokenizer. `edit(state)` changes the state dict before saving."""
    tok = llama3_tokenizer(words, spare_pad=spare_pad)
    pad = {"spare": tok.pad_token_id, "eot": tok.convert_tokens_to_ids("<|eot_id|>"), None: None}[pad_id]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                         tie_word_embeddings=False)
    state = published_state_dict(config)
    if edit is not None:
        edit(state)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = {**config.to_dict(), "architectures": ["LlamaForRewardModelWithGating"], "num_objectives": N_OBJECTIVES,
           "gating_hidden_dim": GATING_HIDDEN, "gating_n_hidden": GATING_LAYERS, "gating_temperature": TEMPERATURE,
           "auto_map": {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}}
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def armorm_dir(tmp_path_factory, task):
    return save_tiny_armorm(tmp_path_factory.mktemp("armorm") / "ArmoRM-tiny", task.words)


# ------------------------------------------------------------------------------------------ the reference


@torch.no_grad()
def reference_scores(folder: Path, token_ids: list[list[int]], pattern: list[int]) -> list[float]:
    """ArmoRM's score per sequence, computed one sequence at a time from the raw state dict: the backbone's last
    hidden states (a plain LlamaModel loaded with the `model.` keys), then the heads with plain torch ops."""
    state = load_file(str(folder / "model.safetensors"))
    config = LlamaConfig.from_pretrained(folder)
    backbone = LlamaModel(config).eval()
    backbone.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
    scores = []
    for ids in token_ids:
        hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, H], no padding at all
        starts = [j for j in range(len(ids) - len(pattern) + 1) if ids[j:j + len(pattern)] == pattern]
        x = hidden[starts[-1]]  # the start of the last end-of-prompt pattern
        for i in range(GATING_LAYERS + 1):
            x = x @ state[f"gating.layers.{i}.weight"].T + state[f"gating.layers.{i}.bias"]
            if i < GATING_LAYERS:
                x = torch.relu(x)
        weights = torch.exp(x / TEMPERATURE) / torch.exp(x / TEMPERATURE).sum() * state["gating.logit_scale"]
        rewards = state["regression_layer.weight"] @ hidden[-1]  # the last token: ArmoRM reads the final eot
        scores.append(float((weights * (rewards @ state["reward_transform_matrix"])).sum()))
    return scores


def test_scores_equal_an_independent_computation_from_the_raw_state_dict(tmp_path, armorm_dir):
    cfg = make_cfg(tmp_path, ["algo=ppo", "reward=armorm", f"reward.path={armorm_dir}", "reward.dtype=float32",
                              "reward.batch_size=2"])
    rm = build_reward(cfg, tmp_path / "sft")  # the config path: reward=armorm reward.path=<dir>
    assert isinstance(rm, ClassifierReward) and isinstance(rm.model, ArmoRMForScoring) and rm.builder == "armorm"
    prompts = ["unused"] * 3
    got = rm.score(prompts, RESPONSES, messages=TURNS)
    ids = rm.encode(prompts, RESPONSES, TURNS)
    tokens = rm.tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens[-8:] == ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n", "t3", "t1",
                           "<|eot_id|>"]
    pattern = rm.tokenizer("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                           add_special_tokens=False)["input_ids"]
    assert len(pattern) == 5 and list(rm.model.gating_pattern) == pattern
    expected = torch.tensor(reference_scores(armorm_dir, ids, pattern))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.unique().numel() == 3 and got.dtype == torch.float32
    # batched (right padded, sorted by length) == one at a time; another batch size gives the same scores
    alone = torch.cat([rm.score(["unused"], [r], messages=[t]) for t, r in zip(TURNS, RESPONSES)])
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_outputs_score_rewards_and_gating(armorm_dir):
    rm = ClassifierReward(armorm_dir, batch_size=4)
    batch = rm._pad_right(rm.encode(["x", "x"], RESPONSES[:2], TURNS[:2]))
    out = rm.model(**batch)
    assert out.score.shape == (2,) and out.rewards.shape == (2, N_OBJECTIVES)
    assert out.gating_output.shape == (2, N_OBJECTIVES)
    scale = load_file(str(armorm_dir / "model.safetensors"))["gating.logit_scale"]
    torch.testing.assert_close(out.gating_output.sum(-1), scale.expand(2))  # softmax weights times logit_scale
    transform = rm.model.reward_transform_matrix
    torch.testing.assert_close(out.score, (out.gating_output * (out.rewards @ transform)).sum(-1))
    assert not torch.allclose(transform, torch.eye(N_OBJECTIVES))  # the checkpoint's matrix, not the init


def test_remote_code_is_never_run_for_armorm(armorm_dir):
    """The config names a remote modeling file that does not exist: trust_remote_code=true must not reach it."""
    rm = ClassifierReward(armorm_dir, trust_remote_code=True)
    assert isinstance(rm.model, ArmoRMForScoring)


# ------------------------------------------------------------------------------------------ the pieces


def test_gating_reads_the_last_pattern_among_real_tokens():
    p = list(PUBLISHED_GATING_PATTERN)
    ids = torch.tensor([[1, *p, 7, *p, 8, 9, 0, 0],  # two turns: the last pattern starts at 7
                        [*p, 5, 5, 5, 5, 0, 0, 0, 0, 0, 0, 0],  # at 0
                        [2, 3, *p, 4, *p[:3], 0, 0, 0, 0, 0]])  # a truncated copy after the real one, then pads
    mask = (ids != 0).long()
    assert gating_positions(ids, mask, p).tolist() == [7, 0, 2]
    assert last_real_positions(mask).tolist() == [13, 8, 10]
    padded_pattern = torch.tensor([[3, *p]])  # the pattern in pad positions is not a real one
    with pytest.raises(ValueError, match=r"row\(s\) \[0\].*end-of-prompt pattern"):
        gating_positions(padded_pattern, torch.tensor([[1, 1, 1, 0, 0, 0]]), p)


def test_missing_gating_pattern_fails_clearly(armorm_dir):
    rm = ClassifierReward(armorm_dir)
    with pytest.raises(ValueError, match="end-of-prompt pattern.*Llama-3"):
        rm.score(["<user> s3 s1 <assistant>"], ["t3 t1"])  # no user turns: plain text, no chat template


@pytest.mark.parametrize("change,expected", [
    (lambda s: s.pop("gating.logit_scale"), r"missing keys: \['gating.logit_scale'\]"),
    (lambda s: s.pop("reward_transform_matrix"), r"missing keys: \['reward_transform_matrix'\]"),
    (lambda s: s.update({"score.weight": torch.zeros(1, HIDDEN)}), r"unexpected keys: \['score.weight'\]"),
    (lambda s: s.update({"lm_head.weight": torch.zeros(64, HIDDEN)}), r"unexpected keys: \['lm_head.weight'\]"),
])
def test_a_missing_or_extra_key_fails_naming_it(tmp_path, task, change, expected):
    folder = save_tiny_armorm(tmp_path / "bad", task.words, edit=change)
    cfg = make_cfg(tmp_path, ["algo=ppo", "reward=armorm", f"reward.path={folder}"])
    with pytest.raises(ModelUnavailableError, match=expected) as err:
        build_reward(cfg, tmp_path / "sft")
    assert "reward.path" in str(err.value) and "published layout" in str(err.value)


def test_a_mis_shaped_key_fails_naming_it(tmp_path, task):
    def wrong_gating(state):
        state["gating.layers.0.weight"] = torch.zeros(GATING_HIDDEN + 1, HIDDEN)
    folder = save_tiny_armorm(tmp_path / "bad", task.words, edit=wrong_gating)
    with pytest.raises(ModelUnavailableError, match="gating.layers.0.weight"):
        ClassifierReward(folder)


# ------------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("pad_id", [None, "eot"])  # no pad anywhere (falls back to EOS = <|eot_id|>), or pad = eot
def test_llama3_reward_model_never_pads_with_end_of_turn(tmp_path, task, pad_id):
    folder = save_tiny_armorm(tmp_path / "rm", task.words, pad_id=pad_id)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    rm = ClassifierReward(folder)
    spare = rm.tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert rm.tokenizer.pad_token_id == rm.model.config.pad_token_id == spare
    reference = ClassifierReward(save_tiny_armorm(tmp_path / "ok", task.words))
    torch.testing.assert_close(rm.score(["x"] * 3, RESPONSES, TURNS), reference.score(["x"] * 3, RESPONSES, TURNS))


def test_llama3_classifier_padding_with_eot_is_fixed_or_refused(tmp_path, task):
    """A plain LlamaForSequenceClassification reads its score at the last token that is not the pad id: with
    pad = <|eot_id|> it would read one token early. A spare special token becomes the pad; without one, an error."""
    from transformers import LlamaForSequenceClassification

    def save(folder, spare_pad):
        tok = llama3_tokenizer(task.words, spare_pad=spare_pad)
        tok.pad_token = "<|eot_id|>"
        config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder

    rm = ClassifierReward(save(tmp_path / "fixable", spare_pad=True))
    assert rm.tokenizer.convert_ids_to_tokens(rm.model.config.pad_token_id) == "<|finetune_right_pad_id|>"
    ids = rm.encode(["x"], ["t3 t1"], [TURNS[0]])[0]
    assert ids[-1] == rm.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    with torch.no_grad():  # the score head on the final <|eot_id|>'s hidden state, whatever the pad id
        full = rm.model.score(rm.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1])[0]
    torch.testing.assert_close(rm.score(["x", "x"], ["t3 t1", "t1 t2 t3 t4 t5"], [TURNS[0]] * 2)[0], full,
                               rtol=0, atol=1e-5)
    with pytest.raises(ModelUnavailableError, match=r"pad id \d+ is EOS/<\|eot_id\|>.*pad_token_id"):
        ClassifierReward(save(tmp_path / "unfixable", spare_pad=False))


# ------------------------------------------------------------------------------------------ judge and preflight


def test_reward_model_judge_loads_armorm_natively(tmp_path, armorm_dir):
    from po_experiments.config import PaperDataConfig
    from po_experiments.evaluation.judges import RewardModelJudge

    cfg = OmegaConf.create({"data": OmegaConf.structured(PaperDataConfig), "eval": {"reward_model": {
        "path": str(armorm_dir), "trust_remote_code": False, "dtype": "float32", "batch_size": 2}}})
    judge = RewardModelJudge(cfg, tmp_path)
    assert isinstance(judge.reward.model, ArmoRMForScoring)
    instructions = ["s3 s1", "s1 s2 s3 s4 s5", "s9"]
    pairs = [{"instruction": i, "prompt": "templated by the policy", "output_1": r, "output_2": "t0"}
             for i, r in zip(instructions, RESPONSES)]
    verdicts = judge.judge(pairs)
    direct = ClassifierReward(armorm_dir).score(["x"] * 3, RESPONSES, [[{"role": "user", "content": i}]
                                                                      for i in instructions])
    assert [v["reward_1"] for v in verdicts] == pytest.approx(direct.tolist(), abs=1e-5)
    assert judge.name == "reward_model-ArmoRM-tiny"


def broken_rm(tmp_path, armorm_dir, how: str) -> Path:
    folder = tmp_path / how
    folder.mkdir()
    for f in armorm_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    if how == "unknown_architecture":
        config["architectures"], config["model_type"] = ["MysteryRewardModel"], "mystery"
        config.pop("auto_map")
    elif how == "custom_code":
        config["architectures"] = ["SomeOtherRewardModel"]
    elif how == "causal_lm":
        config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text("{ not json" if how == "unreadable" else json.dumps(config))
    if how == "no_weights":
        (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("how,expected", [
    ("unknown_architecture", "unknown architecture"), ("unreadable", "cannot read its config.json"),
    ("custom_code", r"needs the checkpoint's own code and reward.trust_remote_code=false"),
    ("causal_lm", "not a sequence classifier"), ("no_weights", "no weights files"),
])
def test_preflight_fails_in_seconds_naming_the_key(tmp_path, armorm_dir, how, expected):
    folder = broken_rm(tmp_path, armorm_dir, how)
    cfg = make_cfg(tmp_path, ["algo=ppo", "reward=armorm", f"reward.path={folder}"])
    started = time.time()
    with pytest.raises(ModelUnavailableError, match=expected) as err:
        preflight_reward(cfg)
    assert time.time() - started < 5 and f"reward.path={folder}" in str(err.value)
    preflight_reward(make_cfg(tmp_path, ["algo=ppo", "reward=armorm", f"reward.path={armorm_dir}"]))  # passes
    preflight_reward(make_cfg(tmp_path, ["algo=dpo", "reward=armorm", f"reward.path={folder}"]))  # DPO: no RM


def test_judge_preflight_checks_the_reward_model_and_the_local_judge(tmp_path, armorm_dir):
    from po_experiments.evaluation import judges

    bad = broken_rm(tmp_path, armorm_dir, "unknown_architecture")
    cfg = make_cfg(tmp_path, ["eval.judge=reward_model", f"eval.reward_model.path={bad}"])
    with pytest.raises(ModelUnavailableError, match=f"eval.reward_model.path={bad}: unknown architecture"):
        judges.preflight(cfg)
    judges.preflight(make_cfg(tmp_path, ["eval.judge=reward_model", f"eval.reward_model.path={armorm_dir}"]))
    judge_llm = ["eval.judge=alpaca_eval", "eval.alpaca_eval.annotator=local"]
    with pytest.raises(ModelUnavailableError, match="eval.alpaca_eval.local_model=.*not a causal LM"):
        judges.preflight(make_cfg(tmp_path, [*judge_llm, f"eval.alpaca_eval.local_model={armorm_dir}"]))
    assert check_reward_model(str(armorm_dir), "reward.path") == "armorm"


@pytest.mark.slow  # ~20 s of imports on a busy machine; the check itself takes under a second (above)
def test_run_py_stops_before_sft_on_an_unbuildable_reward_model(tmp_path, armorm_dir):
    bad = broken_rm(tmp_path, armorm_dir, "unknown_architecture")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    started = time.time()
    proc = subprocess.run([sys.executable, "run.py", "algo=ppo", "reward=armorm", f"reward.path={bad}", "logger=none",
                           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "reward.path" in proc.stderr and "unknown architecture" in proc.stderr
    assert "Traceback" not in proc.stderr and time.time() - started < 60
    assert not (tmp_path / "cache" / "sft").exists()


# ------------------------------------------------------------------------------------------ PPO


@pytest.mark.slow
def test_ppo_on_the_embedded_task_with_armorm(tmp_path, armorm_dir):
    """`reward=armorm reward.path=<tiny checkpoint>` end to end: the RM reads each synthetic prompt as a user turn
    through its Llama-3 template (the gating pattern is found), PPO trains and checkpoints, the run finishes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    args = ["algo=ppo", "reward=armorm", f"reward.path={armorm_dir}", "reward.dtype=float32", "data.n_sft=500",
            "model.sft.max_steps=10", "data.n_pref_prompts=64", "data.n_heldout=16", "model.ppo.batch_size=16",
            "model.ppo.save_steps=2", "model.ppo.logging_steps=1", "analysis.enabled=false", "runtime.threads=1",
            "logger=none", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "ppo" and summary["final_step"] == 4  # 64 prompts / 16 per update
    assert (run_dir / "checkpoints" / "step-2" / "rollout.pt").exists()
    history = json.loads((run_dir / "model" / "log_history.json").read_text())
    scores = [h["objective/scores"] for h in history if "objective/scores" in h]
    assert len(scores) == 4 and all(s == s and s != 0 for s in scores)  # ArmoRM's scores reached PPO, none NaN
    assert "no user turns were given" not in proc.stdout + proc.stderr  # it read its own template


# ------------------------------------------------------------------------------------------ large judges


@pytest.fixture
def tiny_causal_lm(tmp_path, tokenizer):
    from po_experiments.models import build_tiny_model

    arch = OmegaConf.create({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 64, "max_position_embeddings": 64})
    model = build_tiny_model(arch, tokenizer, seed=0)
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm", sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("free_bytes,expected", [(10 ** 12, {"": 0}), (10 ** 4, "auto")])
def test_a_model_larger_than_one_gpu_is_spread_with_device_map_auto(monkeypatch, tiny_causal_lm, free_bytes,
                                                                    expected):
    """Without a GPU here: CUDA is faked, and what reaches from_pretrained is recorded. Weights that fit 80 % of
    the current GPU's free memory load onto it; more is spread with device_map='auto', never `.to(cuda)`."""
    from po_experiments import models

    folder, n_params = tiny_causal_lm
    assert models.weight_bytes(folder, torch.bfloat16) == 2 * n_params  # counted on the meta device
    calls = []

    class Loaded(torch.nn.Module):
        def to(self, *args, **kwargs):
            raise AssertionError("a model loaded for inference on CUDA must not be moved whole")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes))
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kw: calls.append(kw) or Loaded())
    model, tok = models.load_for_inference(folder, "bfloat16")
    assert calls == [{"dtype": torch.bfloat16, "device_map": expected}] and not model.training


def test_cpu_inference_loading_is_unchanged(tiny_causal_lm):
    from po_experiments.models import load_for_inference

    model, tok = load_for_inference(tiny_causal_lm[0], "bfloat16")
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert tok.pad_token is not None
