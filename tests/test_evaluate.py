"""Evaluation: the win-rate definition, and every judge through its real code (gold, a reward model, and
alpaca_eval's annotator with a local judge LLM)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from po_experiments.config import AlpacaEvalConfig, SyntheticDataConfig
from po_experiments.errors import ConfigError, ModelUnavailableError
from po_experiments.evaluation import local_judge
from po_experiments.evaluation.judges import AlpacaEvalJudge, GoldJudge, RewardModelJudge, preference_from_scores
from po_experiments.evaluation.stage import EvalPrompts, pairs, write_table
from po_experiments.evaluation.winrate import win_rate

from conftest import SHARED_DATA
from test_rewards import save_tiny_rm

# ------------------------------------------------------------------------------------------ the definition


def test_win_rate_by_hand():
    wr = win_rate([2.0, 1.0, 1.5, 2.0])  # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    assert wr.win_rate == pytest.approx(62.5)
    scores = [1, 0, 0.5, 1]
    se = math.sqrt(sum((s - 0.625) ** 2 for s in scores) / 3 / 4)  # sample std (ddof 1) / sqrt(n)
    assert wr.standard_error == pytest.approx(100 * se)
    assert (wr.n, wr.n_wins, wr.n_draws, wr.n_dropped) == (4, 2, 1, 0)


def test_ties_unparsed_and_legacy_encodings():
    assert win_rate([1.5, 1.5]).win_rate == 50.0 and win_rate([1.5, 1.5]).standard_error == 0.0
    assert win_rate([0, 2]).win_rate == pytest.approx(75.0)  # alpaca_eval's legacy tie 0 == 1.5
    wr = win_rate([2.0, None, float("nan"), 1.0])  # unparsed verdicts are dropped, not counted as losses
    assert (wr.win_rate, wr.n, wr.n_dropped) == (50.0, 2, 2)
    assert math.isnan(win_rate([2.0]).standard_error) and math.isnan(win_rate([]).win_rate)
    with pytest.raises(ValueError, match="AlpacaEval's encoding"):
        win_rate([3.0])


def test_win_rate_agrees_with_alpaca_eval():
    from alpaca_eval.metrics import get_winrate

    rng = random.Random(0)
    preferences = [rng.choice([1.0, 2.0, 1.5, 1 + rng.random()]) for _ in range(200)]
    ours, theirs = win_rate(preferences), get_winrate([{"preference": p} for p in preferences])
    assert ours.win_rate == pytest.approx(theirs["win_rate"])
    assert ours.standard_error == pytest.approx(theirs["standard_error"])
    assert ours.n == theirs["n_total"]


def test_preference_from_scores():
    assert [preference_from_scores(*s) for s in ((0.1, 0.2), (0.2, 0.1), (0.3, 0.3))] == [2.0, 1.0, 1.5]


# ------------------------------------------------------------------------------------------ judges


def synthetic_cfg(**eval_keys):
    return OmegaConf.create({"data": OmegaConf.structured(SyntheticDataConfig), "eval": eval_keys})


def prompts_of(instructions, inputs=None):
    n = len(instructions)
    return EvalPrompts(instructions, inputs or instructions, ["test"] * n, list(range(n)), 8)


def test_gold_judge_prefers_the_higher_gold_reward(tmp_path):
    ep = prompts_of(["<user> s1 s2 <assistant>"] * 3)
    verdicts = GoldJudge(synthetic_cfg(), tmp_path).judge(
        pairs(ep, ["t2 t2", "t1 t2", "t1 t2"], ["t1 t2", "t2 t2", "t1 t2 <eos>"], ("sft", "policy")))
    assert [v["preference"] for v in verdicts] == [2.0, 1.0, 1.5]
    assert verdicts[0]["reward_2"] > verdicts[0]["reward_1"] and verdicts[0]["annotator"] == "gold"
    assert {"instruction", "output_1", "generator_1", "output_2", "generator_2", "preference"} <= set(verdicts[0])


def test_reward_model_judge_compares_the_rm_scores(tmp_path, task):
    from po_experiments.models import build_word_tokenizer
    from po_experiments.rewards import ClassifierReward

    rm = save_tiny_rm(tmp_path / "tiny_rm", build_word_tokenizer(task.words))
    cfg = synthetic_cfg(reward_model={"path": str(rm), "trust_remote_code": False, "dtype": "float32",
                                      "batch_size": 4})
    judge = RewardModelJudge(cfg, tmp_path)
    prompt = "<user> s1 s2 s3 <assistant>"
    reference, candidate = ["t1 t2 t3", "t4", "t2 t2", "t5 t6"], ["t3 t2 t1", "t4 t4 t4", "t2 t2", "t6"]
    verdicts = judge.judge(pairs(prompts_of([prompt] * 4), reference, candidate, ("sft", "policy")))
    direct = ClassifierReward(rm, batch_size=1)
    r1, r2 = direct.score([prompt] * 4, reference).tolist(), direct.score([prompt] * 4, candidate).tolist()
    assert [v["reward_1"] for v in verdicts] == pytest.approx(r1, abs=1e-5)
    assert [v["preference"] for v in verdicts] == [preference_from_scores(a, b) for a, b in zip(r1, r2)]
    assert verdicts[2]["preference"] == 1.5  # identical outputs tie
    assert len({v["preference"] for v in verdicts}) > 1  # the RM does discriminate
    assert judge.name == "reward_model-tiny_rm"


# ------------------------------------------------------------------------------------------ alpaca_eval


def save_local_judge(folder, answer: str):
    """A tiny causal LM that always answers `answer`: its final norm outputs a constant vector, which only the
    answer's row of the output matrix matches. A chat template with a system turn, like a real judge's."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", "m", "M", "##"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = ("{% for m in messages %}## {{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}## assistant\n{% endif %}")
    tokenizer.save_pretrained(folder)
    config = GPTNeoXConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.zero_()
        model.gpt_neox.final_layer_norm.bias.fill_(1.0)
        model.get_output_embeddings().weight.zero_()
        model.get_output_embeddings().weight[vocab[answer]] = 1.0
    model.save_pretrained(folder)
    return folder


def alpaca_cfg(judge_dir, n=12):
    ae = OmegaConf.structured(AlpacaEvalConfig)
    ae.annotator, ae.local_model, ae.local_batch_size, ae.local_dtype = "local", str(judge_dir), 4, "float32"
    return OmegaConf.create({"eval": {"alpaca_eval": ae}})


@pytest.fixture(scope="module")
def instructions():
    path = SHARED_DATA / "alpaca_eval_805_instructions.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    rows = json.loads(path.read_text())
    assert len(rows) == 805
    return rows[:12]


def judged_by(answer, tmp_path, instructions):
    judge = AlpacaEvalJudge(alpaca_cfg(save_local_judge(tmp_path / answer / "judge", answer)), tmp_path / answer)
    ep = prompts_of([r["instruction"] for r in instructions])
    reference = [f"reference answer {i}" for i in range(12)]
    candidate = [f"policy answer {i}" for i in range(12)]
    return judge.judge(pairs(ep, reference, candidate, ("sft-tiny", "dpo-tiny")))


def test_alpaca_eval_with_a_local_judge(tmp_path, instructions):
    """The real alpaca_eval annotator: its prompt, its per-instruction random order, its parser and cache."""
    first, second = judged_by("m", tmp_path, instructions), judged_by("M", tmp_path, instructions)
    # A judge that always names the first output shown (m) or the second (M): alpaca_eval shuffled the two
    # outputs per instruction, so verdicts vary, and it mapped each answer back, so the two judges disagree always.
    prefs = [v["preference"] for v in first]
    assert set(prefs) == {1.0, 2.0}
    assert [a + b["preference"] for a, b in zip(prefs, second)] == [3.0] * 12
    assert {v["raw_completion"].split()[0] for v in first} == {"m"} and {v["raw_completion"].split()[0] for v in second} == {"M"}
    assert win_rate(prefs).win_rate == pytest.approx(100 * prefs.count(2.0) / 12)
    assert first[0]["annotator"] == "local_judge" and first[3]["output_2"] == "policy answer 3"

    cached = json.loads((tmp_path / "m" / "local_judge" / "annotations.json").read_text())
    assert len(cached) == 12  # alpaca_eval's annotation cache: a re-run asks the judge nothing twice
    prompt = (tmp_path / "m" / "local_judge" / "prompt.txt").read_text()
    assert prompt.startswith("## system\n") and prompt.endswith("## assistant\n") and "{output_2}" in prompt


def test_unknown_or_keyless_annotators_fail_with_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="eval.alpaca_eval.annotator.*weighted_alpaca_eval_gpt4_turbo"):
        local_judge.check_packaged_annotator("no_such_annotator")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelUnavailableError, match="OPENAI_API_KEY.*annotator=local"):
        local_judge.check_packaged_annotator("weighted_alpaca_eval_gpt4_turbo")
    with pytest.raises(ConfigError, match="eval.alpaca_eval.local_model"):
        local_judge.local_source(None)


def real_data_judge_cfg(judge: str, **alpaca_eval):
    return OmegaConf.create({"data": {"name": "paper"}, "eval": {
        "judge": judge, "alpaca_eval": {"annotator": "weighted_alpaca_eval_gpt4_turbo", "local_model": None,
                                        **alpaca_eval}}})


def test_real_data_without_a_judge_stops_in_preflight_unless_none_is_explicit(monkeypatch):
    from po_experiments.evaluation import judges

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError) as err:
        judges.preflight(real_data_judge_cfg("auto"))
    message = str(err.value)
    assert message.startswith("eval.judge=auto found no judge") and "OPENAI_API_KEY" in message
    for fix in ("eval.alpaca_eval.annotator=local eval.alpaca_eval.local_model=", "eval.judge=reward_model",
                "eval.judge=none"):
        assert fix in message
    judges.preflight(real_data_judge_cfg("none"))  # explicit: outputs only, no error
    synthetic = OmegaConf.merge(real_data_judge_cfg("auto"), {"data": {"name": "synthetic"}})
    assert judges.resolve_judge(synthetic) == "gold"
    judges.preflight(synthetic)  # the embedded task: gold, always there
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert judges.resolve_judge(real_data_judge_cfg("auto")) == "alpaca_eval"
    judges.preflight(real_data_judge_cfg("auto"))  # the key is there: the packaged annotator can run


def test_length_controlled_win_rate_is_left_empty_offline(monkeypatch):
    from po_experiments.evaluation.stage import length_controlled

    verdicts = [{"instruction": f"q{i}", "output_1": "a" * i, "output_2": "b", "generator_1": "sft",
                 "generator_2": "dpo", "annotator": "x", "index": i, "preference": 1.0 + i % 2} for i in range(10)]
    assert length_controlled(verdicts) == (None, None)  # the GLM's data is on the Hub, unreachable here


def test_win_rate_table_keeps_one_row_per_judge_and_step(tmp_path):
    row = lambda judge, step, rate: {"judge": judge, "step": step, "win_rate": rate}  # noqa: E731
    write_table(tmp_path / "win_rate.csv", [row("gold", 10, 50.0), row("gold", 20, 60.0)])
    table = write_table(tmp_path / "win_rate.csv", [row("rm", 20, 55.0), row("gold", 20, 61.0)])
    assert table[["judge", "step", "win_rate"]].values.tolist() == [["gold", 10, 50.0], ["gold", 20, 61.0],
                                                                   ["rm", 20, 55.0]]


# ------------------------------------------------------------------------------------------ the SFT reference


def run_cfg(tmp_path, seed: int, **eval_keys):
    return OmegaConf.create({
        "data": OmegaConf.structured(SyntheticDataConfig), "seed": seed, "model": {"name": "tiny"},
        "algo": {"name": "dpo"}, "sft": {"enabled": True, "seed": 0}, "paths": {"cache_dir": str(tmp_path / "cache")},
        "eval": {"judge": "gold", "prompts": "alpaca_eval", "n_prompts": 6, "max_new_tokens": 4,
                 "checkpoints": "final", "n_samples": 2, **eval_keys}})


def test_runs_on_one_sft_model_share_one_reference_generation(tmp_path, tokenizer, monkeypatch):
    """Two PO seeds on the same SFT model: the SFT's greedy outputs are generated once, and both runs are judged
    against that one reference; another max_new_tokens is another reference."""
    from po_experiments.evaluation import stage

    sft_dir = tmp_path / "cache" / "sft" / "abc"
    tokenizer.save_pretrained(sft_dir)
    generated = []

    def fake_generate(cfg, model_dir, inputs, *, max_new_tokens, desc):
        generated.append(Path(model_dir).name)
        return [f"t{len(generated)} t1" for _ in inputs]  # every generation differs: a regeneration would show

    monkeypatch.setattr(stage, "generate_texts", fake_generate)
    for seed in (0, 1):
        run_dir = tmp_path / f"run{seed}"
        stage.evaluate(run_cfg(tmp_path, seed), run_dir, sft_dir, final_step=10)
    assert generated == ["abc", "model", "model"]  # the reference once, each run's policy once
    references = [json.loads((tmp_path / f"run{s}" / "eval" / "outputs" / "reference.json").read_text())
                  for s in (0, 1)]
    assert references[0] == references[1] and references[0][0]["output"] == "t1 t1"
    assert references[0][0]["generator"] == "sft-tiny"
    shared = list((tmp_path / "cache" / "reference_outputs").glob("*.json"))
    assert len(shared) == 1 and json.loads(shared[0].read_text()) == references[0]
    stage.evaluate(run_cfg(tmp_path, 2, max_new_tokens=5), tmp_path / "run2", sft_dir, final_step=10)
    assert generated[3:] == ["abc", "model"]  # what the SFT model is asked changed: its own reference


def test_another_prompt_set_is_judged_under_its_own_name():
    """eval.prompts=hh_helpful on real data: win_rate.csv rows, verdicts and outputs named apart from AlpacaEval's
    (a run judged on both keeps both); the synthetic task has one prompt set and ignores the key."""
    from po_experiments.evaluation.judges import judge_name

    def cfg(data, prompts):
        return OmegaConf.create({"data": {"name": data}, "eval": {"prompts": prompts,
                                                                   "reward_model": {"path": "/models/rm"}}})

    assert judge_name(cfg("paper", "hh_helpful"), "reward_model") == "reward_model-rm@hh_helpful"
    assert judge_name(cfg("paper", "alpaca_eval"), "reward_model") == "reward_model-rm"
    assert judge_name(cfg("synthetic", "hh_helpful"), "gold") == "gold"
