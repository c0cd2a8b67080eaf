"""Rewards for the PPO family: gold, reward-model classifiers (output extraction, padding, chat template), the
learned RM's training and caching, and the builder's errors. All offline, on tiny models."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import GPT2Config, GPT2ForSequenceClassification, GPTNeoXConfig, GPTNeoXForSequenceClassification

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments import rewards
from po_experiments.errors import ConfigError, ModelUnavailableError
from po_experiments.hub import hub_reachable
from po_experiments.models import build_word_tokenizer
from po_experiments.rewards import ClassifierReward, GoldReward, build_reward, reward_from_output

from conftest import make_pairs

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPT = "<user> s3 s1 <assistant>"


def make_cfg(tmp_path, overrides=()):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache",
                                            *overrides])


def save_tiny_rm(folder: Path, tokenizer, *, seed: int = 0, pad_in_config: bool = True, arch: str = "gpt_neox"):
    """A randomly initialised 1-label classifier and its tokenizer, saved like a hub checkpoint.

    GPTNeoX (Pythia) has rotary positions; GPT-2's learned absolute positions make padding mistakes visible."""
    pad = tokenizer.pad_token_id if pad_in_config else None
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        model_cls = GPT2ForSequenceClassification
    else:
        config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, num_labels=1,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        model_cls = GPTNeoXForSequenceClassification
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def word_tokenizer(task):
    return build_word_tokenizer(task.words)  # a fresh one: tests below change its template / padding side


@pytest.fixture
def rm_dir(tmp_path, word_tokenizer):
    return save_tiny_rm(tmp_path / "rm", word_tokenizer)


# --------------------------------------------------------------------------------------------- gold


@pytest.mark.parametrize("response,expected", [
    ("t3 t1", 1.0),  # both right
    ("t3 t2", 0.5),  # one wrong word
    ("t3", 0.25),  # one right, one missing: 1/2 - 0.5 * 1/2
    ("t3 t1 t1", 0.75),  # both right, one extra: 1 - 0.5 * 1/2
    ("t4 t2", 0.0),
])
def test_gold_reward_matches_the_task(task, response, expected):
    got = GoldReward(task).score([PROMPT, PROMPT], [response, " " + response])
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert got.tolist() == pytest.approx([expected, expected])
    assert got[0].item() == pytest.approx(task.gold_reward(PROMPT, response))


def test_gold_reward_rejects_mismatched_lengths(task):
    with pytest.raises(ValueError, match="same length"):
        GoldReward(task).score([PROMPT], ["t3", "t1"])


# --------------------------------------------------------------------------------------------- output extraction


def test_score_attribute_wins_over_logits():
    armorm_like = SimpleNamespace(score=torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.bfloat16),
                                  logits=torch.randn(3, 19))  # per-objective rewards: not the preference score
    got = reward_from_output(armorm_like)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert got.tolist() == [0.5, -1.0, 2.0]
    assert reward_from_output(SimpleNamespace(score=torch.tensor([1.0, 2.0]))).tolist() == [1.0, 2.0]


def test_plain_classifier_reads_first_logit():
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    got = reward_from_output(SequenceClassifierOutputWithPast(logits=torch.tensor([[0.25], [-3.0]])))
    assert got.shape == (2,) and got.tolist() == [0.25, -3.0]


def test_ambiguous_score_shape_is_refused():
    with pytest.raises(ValueError, match="shape"):
        reward_from_output(SimpleNamespace(score=torch.zeros(2, 3)))


# --------------------------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_classifier_scores_are_deterministic_and_padding_free(tmp_path, word_tokenizer, arch):
    rm_dir = save_tiny_rm(tmp_path / arch, word_tokenizer, arch=arch)
    rm = ClassifierReward(rm_dir, batch_size=8)
    prompts = [PROMPT, "<user> s1 s2 s3 s4 s5 s6 <assistant>", "<user> s9 <assistant>"]
    responses = ["t3 t1", "t1 t2 t3 t4 t5 t6 t6 t7", "t9"]
    batch = rm.score(prompts, responses)
    assert batch.shape == (3,) and batch.dtype == torch.float32 and batch.device.type == "cpu"
    assert torch.equal(batch, rm.score(prompts, responses))
    alone = torch.cat([rm.score([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    assert batch.unique().numel() == 3  # a real function of the text, not a constant
    rm.tokenizer.padding_side = "left"  # the tokenizer's own setting must not matter
    torch.testing.assert_close(rm.score(prompts, responses), batch, rtol=0, atol=1e-5)
    again = ClassifierReward(rm_dir, batch_size=1)  # reloaded, batch size 1
    torch.testing.assert_close(again.score(prompts, responses), batch, rtol=0, atol=1e-5)


def test_missing_pad_token_id_is_taken_from_the_tokenizer(tmp_path, word_tokenizer):
    folder = save_tiny_rm(tmp_path / "nopad", word_tokenizer, pad_in_config=False)
    rm = ClassifierReward(folder, batch_size=4)
    assert rm.model.config.pad_token_id == word_tokenizer.pad_token_id
    batch = rm.score([PROMPT, "<user> s1 s2 s3 s4 <assistant>"], ["t3", "t1 t2 t3 t4"])  # batch > 1 needs a pad id
    torch.testing.assert_close(batch[:1], rm.score([PROMPT], ["t3"]), rtol=0, atol=1e-5)


def test_plain_text_is_prompt_response_eos(rm_dir):
    rm = ClassifierReward(rm_dir)
    turns = [{"role": "user", "content": "s3 s1"}]
    assert rm.tokenizer.chat_template is None
    assert rm.format(PROMPT, "t3 t1") == (PROMPT + "t3 t1<eos>", False)
    assert rm.format(PROMPT, " t3 t1", turns) == (PROMPT + " t3 t1<eos>", False)  # no template: turns unused
    ids = rm.encode([PROMPT], ["t3 t1"])[0]
    assert rm.tokenizer.convert_ids_to_tokens(ids) == ["<user>", "s3", "s1", "<assistant>", "t3", "t1", "<eos>"]


def test_chat_template_formats_user_and_assistant_turns(tmp_path, word_tokenizer):
    word_tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {{ eos_token }} "
                                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    folder = save_tiny_rm(tmp_path / "chat_rm", word_tokenizer)
    turns = [{"role": "user", "content": "s3 s1"}]
    policy_prompt = "<|user|>\ns3 s1<|endoftext|>\n<|assistant|>\n"  # the policy's own template: not what the RM reads

    rm = ClassifierReward(folder)
    text, templated = rm.format(policy_prompt, "t3 t1", turns)
    assert (text, templated) == ("<user> s3 s1 <eos> <assistant> t3 t1 <eos> ", True)
    ids = rm.encode([policy_prompt], ["t3 t1"], messages=[turns])[0]
    assert rm.tokenizer.convert_ids_to_tokens(ids) == ["<user>", "s3", "s1", "<eos>", "<assistant>", "t3", "t1",
                                                       "<eos>"]
    # without turns the RM falls back to the policy's text; the two must really differ
    assert rm.format(policy_prompt, "t3 t1")[1] is False

    explicit = rm.score([policy_prompt], ["t3 t1"], messages=[turns])
    by_lookup = ClassifierReward(folder, messages={policy_prompt: turns}).score([policy_prompt], ["t3 t1"])
    by_callable = ClassifierReward(folder, messages=lambda p: turns).score([policy_prompt], ["t3 t1"])
    torch.testing.assert_close(explicit, by_lookup)
    torch.testing.assert_close(explicit, by_callable)
    reference = rm.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    torch.testing.assert_close(explicit, reference.logits[:, 0].detach(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- learned RM


@pytest.mark.slow  # a subprocess or a training run: the fast tier stays under 3 minutes
def test_train_reward_model_beats_chance_on_held_out_pairs(tmp_path, task, word_tokenizer, monkeypatch):
    sft_dir = tmp_path / "sft"
    from po_experiments.models import build_tiny_model
    from omegaconf import OmegaConf

    arch = OmegaConf.create({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 64, "max_position_embeddings": 64})
    build_tiny_model(arch, word_tokenizer, seed=0).save_pretrained(sft_dir)
    word_tokenizer.save_pretrained(sft_dir)
    monkeypatch.setattr(rewards, "preference_data", lambda cfg, sft, tok: make_pairs(task, 3000, seed=0))
    cfg = make_cfg(tmp_path, ["reward=learned", "reward.train.learning_rate=3e-3", "reward.train.epochs=5",
                              "reward.train.batch_size=32"])

    started = time.time()
    rewards.train_reward_model(cfg, sft_dir, tmp_path / "rm")
    assert time.time() - started < 60
    metrics = json.loads((tmp_path / "rm" / "reward_metrics.json").read_text())
    assert metrics["train_pairs"] == 2700 and metrics["heldout_pairs"] == 300
    assert metrics["train_loss"] < 0.69 and 0.0 <= metrics["heldout_accuracy"] <= 1.0
    assert not (tmp_path / "rm" / "trainer").exists()

    rm = ClassifierReward(tmp_path / "rm")
    fresh = make_pairs(task, 300, seed=1)  # prompts and samples it never saw; chosen = gold-better
    accuracy = rewards.pairwise_accuracy(rm, fresh)
    assert accuracy > 0.65, accuracy  # measured 0.75 (chance 0.5, 300 pairs: one standard error 0.03)
    assert metrics["heldout_accuracy"] > 0.65 and metrics["heldout_gold_agreement"] > 0.65


def test_reward_model_dir_trains_once_per_key(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg, sft_dir, out_dir):
        calls.append(cfg.reward.train.learning_rate)
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(rewards, "train_reward_model", fake_train)
    cfg = make_cfg(tmp_path, ["reward=learned"])
    first = rewards.reward_model_dir(cfg, tmp_path / "sft")
    assert rewards.reward_model_dir(cfg, tmp_path / "sft") == first and len(calls) == 1
    other = rewards.reward_model_dir(make_cfg(tmp_path, ["reward=learned", "reward.train.learning_rate=1e-5"]),
                                     tmp_path / "sft")
    assert other != first and len(calls) == 2
    same_rm = rewards.reward_model_dir(make_cfg(tmp_path, ["reward=learned", "reward.batch_size=7"]), tmp_path / "sft")
    assert same_rm == first and len(calls) == 2  # the scoring batch does not change the model


def test_learned_reward_model_without_sft_is_the_tasks_one(tmp_path, monkeypatch):
    """sft.enabled=false: PPO starts from the base model, but the task's learned RM is trained from its SFT model
    (the same RM, cache entry and all, as with SFT)."""
    from po_experiments.stages import sft as sft_stage

    sources = []
    monkeypatch.setattr(rewards, "train_reward_model",
                        lambda cfg, sft_dir, out_dir: sources.append(sft_dir) or (Path(out_dir) / "x").touch())
    monkeypatch.setattr(sft_stage, "sft_model_dir", lambda cfg: tmp_path / "sft")
    without = rewards.reward_model_dir(make_cfg(tmp_path, ["reward=learned", "sft.enabled=false"]), tmp_path / "base")
    assert sources == [tmp_path / "sft"]
    assert rewards.reward_model_dir(make_cfg(tmp_path, ["reward=learned"]), tmp_path / "sft") == without


# --------------------------------------------------------------------------------------------- builder


def test_build_reward_gold_and_classifier_on_a_local_copy(tmp_path, task, rm_dir):
    gold = build_reward(make_cfg(tmp_path), tmp_path / "sft")
    assert gold.name == "gold" and gold.score([PROMPT], ["t3 t1"]).tolist() == [1.0]
    rm = build_reward(make_cfg(tmp_path, ["reward=skywork", f"reward.path={rm_dir}", "reward.dtype=float32"]),
                      tmp_path / "sft")
    assert isinstance(rm, ClassifierReward) and rm.score([PROMPT], ["t3"]).shape == (1,)


@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "no" / "such" / "rm",
                                       lambda tmp: (tmp / "empty").mkdir() or tmp / "empty"])
def test_missing_local_reward_model_names_the_key_and_path(tmp_path, make_path):
    path = make_path(tmp_path)
    cfg = make_cfg(tmp_path, ["reward=armorm", f"reward.path={path}"])
    with pytest.raises(ModelUnavailableError) as err:
        build_reward(cfg, tmp_path / "sft")
    assert "reward.path" in str(err.value) and str(path) in str(err.value)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


@pytest.mark.parametrize("reward", ["armorm", "skywork"])
def test_unreachable_hub_reward_model_fails_fast(tmp_path, offline, reward):
    cfg = make_cfg(tmp_path, [f"reward={reward}"])
    started = time.time()
    with pytest.raises(ModelUnavailableError) as err:
        build_reward(cfg, tmp_path / "sft")
    assert time.time() - started < 10
    assert "reward.path" in str(err.value) and cfg.reward.path in str(err.value) and "local copy" in str(err.value)


@pytest.mark.parametrize("kind", ["gold", "learned"])
def test_synthetic_only_rewards_refuse_the_paper_data(tmp_path, kind):
    with pytest.raises(ConfigError, match="reward.kind"):
        build_reward(make_cfg(tmp_path, ["data=paper", f"reward={kind}"]), tmp_path / "sft")


def test_unknown_kind_and_missing_path_name_their_keys(tmp_path):
    with pytest.raises(ConfigError, match="reward.kind"):
        build_reward(make_cfg(tmp_path, ["reward.kind=oracle"]), tmp_path / "sft")
    with pytest.raises(ConfigError, match="reward.path"):
        build_reward(make_cfg(tmp_path, ["reward.kind=classifier"]), tmp_path / "sft")


def test_reward_configs_compose(tmp_path):
    armorm = make_cfg(tmp_path, ["reward=armorm"]).reward
    assert (armorm.kind, armorm.path, armorm.trust_remote_code, armorm.dtype) == (
        "classifier", "RLHFlow/ArmoRM-Llama3-8B-v0.1", False, "bfloat16")  # built natively, never remote code
    skywork = make_cfg(tmp_path, ["reward=skywork"]).reward
    assert (skywork.kind, skywork.path, skywork.trust_remote_code) == (
        "classifier", "Skywork/Skywork-Reward-Llama-3.1-8B", False)
    assert make_cfg(tmp_path, ["reward=learned"]).reward.kind == "learned"
