"""Cache keys (SFT model, pairs, reward model, D' answers) and the analysis key are derived from the schemas
(config.stage_settings with the fields' `how` / `read_by` marks): a setting a stage reads changes its key, any other
does not, and a setting nobody marked is in every key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments.analysis.stage import dprime_cache
from po_experiments.analysis.variants import analysis_key, analysis_settings
from po_experiments.cache import config_hash
from po_experiments.config import how, read_by, run_config, stage_settings
from po_experiments.rewards import reward_key
from po_experiments.stages.pairs import pair_key
from po_experiments.stages.sft import sft_key

CONF = Path(__file__).resolve().parents[1] / "conf"


def make(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.cache_dir=/tmp/y", *overrides])


def keys(cfg) -> dict[str, str]:
    return {"sft": config_hash(sft_key(cfg)), "pairs": config_hash(pair_key(cfg)),
            "reward": config_hash(reward_key(cfg)), "dprime": dprime_cache(cfg, Path("/run")).name,
            "analysis": analysis_key(analysis_settings(cfg))}


# (override, the keys it must change); every other key must stay. Synthetic data (the tiny model).
CHANGES = [
    ("model.sft.learning_rate=0.002", {"sft", "pairs", "reward"}),
    ("model.max_length=48", {"sft", "pairs", "reward"}),
    ("model.arch.hidden_size=64", {"sft", "pairs", "reward"}),
    ("model.dtype=bfloat16", {"sft", "pairs", "reward"}),
    ("data.n_sft=999", {"sft", "pairs", "reward", "dprime"}),  # unmarked: every key that reads data
    ("data.vocab_size=12", {"sft", "pairs", "reward", "dprime"}),
    ("sft.seed=3", {"sft", "pairs", "reward", "dprime"}),  # the training prompts of D'=train come from it
    ("data.n_pref_prompts=77", {"pairs", "reward"}),
    ("data.label_scale=0.3", {"pairs", "reward"}),
    ("data.max_new_tokens=9", {"pairs", "reward", "dprime"}),
    ("data.n_heldout=33", {"dprime"}),
    ("reward.train.learning_rate=0.001", {"reward"}),
    ("analysis.dprime=train", {"dprime", "analysis"}),
    ("analysis.n_dprime=11", {"dprime", "analysis"}),
    ("analysis.n_pairs=40", {"analysis"}),
    ("analysis.dpo_batch_size=8", {"analysis"}),  # G's IQR filter is over mini-batches: another result
    ("analysis.dtype=bfloat16", {"analysis"}),
    # PO-only, how-only and evaluation settings: no key
    ("model.dpo.learning_rate=0.5", set()), ("model.ppo.temperature=0.7", set()), ("algo.beta=0.3", set()),
    ("seed=5", set()), ("model.sft.save_steps=3", set()), ("model.activation_checkpointing=true", set()),
    ("reward.train.save_steps=9", set()), ("analysis.method=ghost", set()), ("analysis.chunk=4", set()),
    ("analysis.vmap_max_params=1", set()), ("analysis.enabled=false", set()),
    ("analysis.exclude_loss_increase=true", set()), ("eval.n_prompts=5", set()), ("runtime.threads=1", set()),
]


@pytest.mark.parametrize("override,changed", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_setting_changes_exactly_the_keys_of_the_stages_that_read_it(override, changed):
    base, other = keys(make()), keys(make(override))
    assert {k for k in base if base[k] != other[k]} == changed


def test_paper_data_sources_are_in_the_keys_of_their_readers_only():
    base = make("model=pythia")
    sft, dprime = config_hash(sft_key(base)), dprime_cache(base, Path("/r")).name
    for override, sft_changes, dprime_changes in (("data.sft.path=/x", True, True),
                                                  ("data.preferences.path=/x", False, True),  # D'=train reads it
                                                  ("data.questions.path=/x", False, True),
                                                  ("data.instructions.path=/x", False, False),
                                                  ("data.num_proc=3", False, False),
                                                  ("data.max_new_tokens=100", False, True)):
        cfg = make("model=pythia", override)
        assert (config_hash(sft_key(cfg)) != sft) == sft_changes, override
        assert (dprime_cache(cfg, Path("/r")).name != dprime) == dprime_changes, override
    train = make("model=pythia", "analysis.dprime=train", "data.preferences.path=/x")
    assert dprime_cache(train, Path("/r")) != dprime_cache(make("model=pythia", "analysis.dprime=train"), Path("/r"))


@pytest.mark.slow
def test_every_model_and_data_setting_sft_reads_is_in_its_key():
    """Exhaustive: each leaf of the model and data sections changes the SFT key unless its field (or a field above
    it) is marked `how` or read by other stages only."""
    cfg = make()
    base = config_hash(sft_key(cfg))
    plain = OmegaConf.to_container(cfg, resolve=True)
    skipped = {"dpo", "cdpo", "ppo", "ppo_variants", "activation_checkpointing", "save_steps", "n_pref_prompts",
               "sample_temperature", "label_scale", "label_flip_p", "n_heldout", "max_new_tokens"}

    def leaves(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}.{k}")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}.{k}", v
    tested = 0
    for key, value in [*leaves(plain["model"], "model"), *leaves(plain["data"], "data")]:
        other = make(f"{key}={value + 1}")
        assert (config_hash(sft_key(other)) == base) == bool(skipped & set(key.split("."))), key
        tested += 1
    assert tested > 25


def test_the_key_of_a_run_config_read_back_from_its_yaml_is_the_same(tmp_path):
    """scripts/analyse_run.py reads the run's saved config (the data section loses its schema type): the same
    SFT model, pairs and D' answers, found by name (config.DATA_SCHEMAS)."""
    cfg = make()
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    again = run_config(run_dir)
    assert keys(again) == keys(cfg)


def test_an_unmarked_new_setting_is_in_every_key():
    @dataclasses.dataclass
    class Section:
        a: int = 1  # unmarked: every stage
        b: int = how(default=2)
        c: int = read_by("pairs", default=3)
        d: int = read_by("sft", "eval", default=4)

    node = OmegaConf.structured(Section)
    assert stage_settings(node, Section, "sft") == {"a": 1, "d": 4}
    assert stage_settings(node, Section, "pairs") == {"a": 1, "c": 3}
    assert stage_settings(node, Section, "pairs", marked_only=True) == {"c": 3}
    assert stage_settings(node, Section) == {"a": 1, "c": 3, "d": 4}
    extra = OmegaConf.merge(OmegaConf.to_container(node), {"e": 5})  # a key the schema does not know: kept
    assert stage_settings(extra, Section, "sft") == {"a": 1, "d": 4, "e": 5}


def test_cached_sft_models_and_pairs_keep_their_keys():
    """The derived keys equal the hand-kept lists they replace (hashes of this commit's parent), so the SFT models,
    pairs and reward models already cached stay valid."""
    tiny = make()
    assert config_hash(sft_key(tiny)) == "fad9e05e23b9501e"
    assert config_hash(pair_key(tiny)) == "7de98d0b85833816"
    assert config_hash(reward_key(tiny)) == "a5d6585a25d302a1"
    assert config_hash(sft_key(make("model=pythia"))) == "210b2bed18e0666a"
    assert config_hash(sft_key(make("model=qwen3"))) == "38da60617b9d4664"
