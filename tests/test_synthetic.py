"""The embedded task: deterministic, a gold reward computed by hand, a demonstrator with the designed flaws."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from po_experiments.data.synthetic import _rng

P = "<user> s1 s2 s3 <assistant>"


@pytest.mark.parametrize("output,reward", [
    ("t1 t2 t3", 1.0),
    ("t1 t2", 2 / 3 - 0.5 / 3),  # one word short
    ("t1 t9 t3 t3", 2 / 3 - 0.5 / 3),  # one wrong, one extra
    ("t2 t3", 0 - 0.5 / 3),  # a dropped first word shifts every position
    ("", -0.5),
    ("t1 t2 t3 <eos>", 1.0),  # special tokens are not words
])
def test_gold_reward_by_hand(task, output, reward):
    assert task.gold_reward(P, output) == pytest.approx(reward)


def test_data_is_deterministic_from_the_seed(task):
    a, b, c = task.sft_dataset(50, seed=3), task.sft_dataset(50, seed=3), task.sft_dataset(50, seed=4)
    assert a["completion"] == b["completion"] and a["completion"] != c["completion"]
    assert task.preference_prompts(20, 1) == task.preference_prompts(20, 1) != task.preference_prompts(20, 2)


def test_heldout_prompts_are_fixed_and_longer(task):
    held = task.heldout_prompts(300)
    assert held == task.heldout_prompts(300)
    lengths = {len(task.parse_prompt(p)) for p in held}
    assert lengths == {5, 6, 7}
    train = {len(task.parse_prompt(p)) for p in task.preference_prompts(300, 0)}
    assert train == {4, 5, 6}


def test_demonstrator_has_the_designed_flaws(task):
    rng = _rng(0, "test")
    errors = np.zeros(task.vocab_size)
    counts = np.zeros(task.vocab_size)
    no_edit = dataclasses.replace(task, edit_p=0.0)
    for _ in range(6000):
        src = no_edit.sample_source(rng)
        out = no_edit.demonstrate(src, rng)
        for i, o in zip(src, out):
            counts[i] += 1
            errors[i] += o != i
    rate = errors / counts
    assert rate[0] == pytest.approx(0.55, abs=0.03) and rate[5] == pytest.approx(0.80, abs=0.03)
    assert np.all(np.diff(rate[:6]) > -0.04)  # rising across the hard words
    assert rate[6:].mean() == pytest.approx(0.10, abs=0.02)
    demos = task.sft_dataset(5000, seed=0)
    gold = np.mean([task.gold_reward(p, c) for p, c in zip(demos["prompt"], demos["completion"])])
    assert gold == pytest.approx(0.645, abs=0.015)  # DESIGN 2b's measured mean demonstration gold


def test_labels_follow_bradley_terry_and_noise(task):
    prompts = task.preference_prompts(400, 0)
    rng = _rng(0, "pairs")
    a = [task.completion_text(task.demonstrate(task.parse_prompt(p), rng)) for p in prompts]
    b = [task.completion_text(task.demonstrate(task.parse_prompt(p), rng)) for p in prompts]
    clean = task.label_pairs(prompts, a, b, scale=1e-4, flip_p=0.0, seed=0)
    flipped = task.label_pairs(prompts, a, b, scale=1e-4, flip_p=1.0, seed=0)
    diff = np.array(clean["gold_chosen"]) - np.array(clean["gold_rejected"])
    assert np.all(diff[np.abs(diff) > 1e-3] > 0)  # a sharp BT scale picks the better answer
    diff = np.array(flipped["gold_chosen"]) - np.array(flipped["gold_rejected"])
    assert np.all(diff[np.abs(diff) > 1e-3] < 0)
    assert all(c.split() != r.split() for c, r in zip(clean["chosen"], clean["rejected"]))  # identical dropped


def test_tokenizer_and_model_round_trip(task, tokenizer, tiny_model, tmp_path):
    ids = tokenizer("<user> s3 s1 <assistant> t3 t1<eos>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<user>", "s3", "s1", "<assistant>", "t3", "t1", "<eos>"]
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("s3 t1", add_special_tokens=False)["input_ids"] == tokenizer("s3 t1", add_special_tokens=False)[
        "input_ids"]
    assert again.eos_token == "<eos>" and again.pad_token == "<pad>"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.model_type == "gpt_neox"

