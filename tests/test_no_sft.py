"""Runs without SFT (`sft.enabled=false`, Fig. 8 b, c): the base model, saved once into the cache with the run's
tokenizer, is policy start and reference; the embedded task's pairs still come from its SFT model."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from datasets import Dataset
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments.models import DEFAULT_CHAT_TEMPLATE, build_tiny_model
from po_experiments.reporting.methods import describe
from po_experiments.stages import pairs as pairs_stage
from po_experiments.stages import sft as sft_stage

CONF = Path(__file__).resolve().parents[1] / "conf"


def make(tmp_path, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=["paths.output_dir=/tmp/x", f"paths.cache_dir={tmp_path / 'cache'}",
                                             *overrides])


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_base_model_is_the_untrained_model_sft_would_start_from(tmp_path, tokenizer):
    cfg = make(tmp_path, "sft.enabled=false", "sft.seed=3")
    folder = sft_stage.start_model_dir(cfg)
    assert folder.parent.name == "base" and (folder / "DONE").exists() and sft_stage.reference_kind(cfg) == "base"
    saved = AutoModelForCausalLM.from_pretrained(folder)
    assert same_weights(saved, build_tiny_model(cfg.model.arch, tokenizer, 3))
    assert not same_weights(saved, build_tiny_model(cfg.model.arch, tokenizer, 0))
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()
    assert sft_stage.start_model_dir(cfg) == folder  # cached: built once
    assert not (tmp_path / "cache" / "sft").exists()  # no SFT was trained for it


def test_real_base_model_folder_carries_the_runs_tokenizer(tmp_path, tokenizer):
    """A real model (model.path): its published weights, with the tokenizer every stage reads (chat template set)."""
    source = tmp_path / "pythia-like"
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(torch.float16)  # published in half precision, like Pythia
    model.save_pretrained(source)
    raw = copy.deepcopy(tokenizer)  # the session's tokenizer stays as it is
    raw.chat_template = None
    raw.save_pretrained(source)
    cfg = make(tmp_path, "sft.enabled=false", f"model.path={source}", "model.name=custom")
    folder = sft_stage.base_model_dir(cfg)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert loaded.dtype == torch.float16 and same_weights(loaded, model)
    assert AutoTokenizer.from_pretrained(folder).chat_template == DEFAULT_CHAT_TEMPLATE


def test_synthetic_pairs_without_sft_come_from_the_sft_model(tmp_path, monkeypatch):
    sampled_from = []

    def fake_sample(cfg, source, out):
        sampled_from.append(source)
        Dataset.from_dict({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}).save_to_disk(str(out / "pairs"))

    monkeypatch.setattr(pairs_stage, "sample_pairs", fake_sample)
    monkeypatch.setattr(sft_stage, "sft_model_dir", lambda cfg: Path("/cache/sft/model"))
    with_sft, without = make(tmp_path), make(tmp_path, "sft.enabled=false")
    pairs_stage.preference_data(without, Path("/cache/base/model"), None)
    assert sampled_from == [Path("/cache/sft/model")]
    pairs_stage.preference_data(with_sft, Path("/cache/sft/model"), None)  # the same pair set, cached
    assert len(sampled_from) == 1


def test_a_run_without_sft_is_its_own_method_and_variant(tmp_path):
    plain, without = describe(make(tmp_path)), describe(make(tmp_path, "sft.enabled=false"))
    assert plain["variant"] == "baseline" and without["variant"] == "no_sft"
    assert without["method"] == "DPO [no SFT, vs base]" and plain["method"] == "DPO"
    fig8 = make(tmp_path, "experiment=fig8", "experiment/method=dpo_no_sft")
    assert fig8.sft.enabled is False and fig8.algo.name == "dpo"
