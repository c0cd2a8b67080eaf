"""What builds a reward or judge checkpoint, decided from its config.json alone (no weights), so a run fails in
seconds, before SFT, instead of when PPO or the win rate first loads the model.

A reward model is built by one of:
- `armorm`: this project's native ArmoRM (`config.architectures == ["LlamaForRewardModelWithGating"]`), never the
  checkpoint's remote code;
- `auto`: a transformers sequence classifier (Skywork, the learned RM, ...);
- `remote`: the checkpoint's own code, only where the config key's `trust_remote_code` is true.
A local judge LLM must be a causal LM transformers builds itself (the judge never runs remote code).
"""
from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

from ..errors import ModelUnavailableError
from .armorm import ARCHITECTURE as ARMORM

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_config(source: str, key: str) -> dict:
    """config.json of a local folder or a hub id (the hub's copy is one small file, cached like the weights)."""
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            path = local / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "config.json"))
        config = json.loads(path.read_text())
    except Exception as err:  # unreadable file, bad JSON, hub errors: all mean the model cannot be built
        raise ModelUnavailableError(f"{key}={source}: cannot read its config.json ({type(err).__name__}: {err})") \
            from err
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{key}={source}: config.json is not a JSON object")
    return config


def check_local_files(source: str, key: str) -> None:
    """A local folder must hold weights and tokenizer files next to config.json (a hub id is checked on load)."""
    local = Path(source).expanduser()
    if not local.is_dir():
        return
    names = {p.name for p in local.iterdir()}
    for what, wanted in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES)):
        if not names.intersection(wanted):
            raise ModelUnavailableError(f"{key}={source}: no {what} files (expected one of {', '.join(wanted)})")


def _trust_key(key: str) -> str:
    return key.rsplit(".", 1)[0] + ".trust_remote_code"


def classifier_builder(config: dict, source: str, key: str, trust_remote_code: bool) -> str:
    """'armorm', 'auto' or 'remote' for a reward model's config (see the module doc), or a ModelUnavailableError
    naming `key` when none of them can build it."""
    archs = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    if ARMORM in archs:
        if model_type != "llama":
            raise ModelUnavailableError(f"{key}={source}: {ARMORM} with model_type={model_type!r}; the native ArmoRM "
                                        "needs a Llama backbone (model_type 'llama')")
        return "armorm"
    custom = [a for a in archs if not hasattr(transformers, a)]
    if not custom and model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        heads = [a for a in archs if a.endswith("ForSequenceClassification")]
        if archs and not heads:  # e.g. a causal LM: the reward head would be drawn at random
            raise ModelUnavailableError(f"{key}={source}: architecture {archs} is not a sequence classifier, so its "
                                        "reward head would be random; point at a reward model")
        return "auto"
    if custom and config.get("auto_map") and trust_remote_code:
        return "remote"
    if custom and config.get("auto_map"):
        raise ModelUnavailableError(
            f"{key}={source}: architecture {custom} needs the checkpoint's own code and {_trust_key(key)}=false. "
            f"This project builds only {ARMORM} (ArmoRM) natively; set {_trust_key(key)}=true to run its code")
    raise ModelUnavailableError(f"{key}={source}: unknown architecture {archs or None} (model_type={model_type!r}): "
                                "neither transformers nor this project can build it as a reward model")


def check_reward_model(source: str, key: str, trust_remote_code: bool = False) -> str:
    """How the reward model at `source` will be built (read from config.json; no weights are loaded)."""
    builder = classifier_builder(read_config(source, key), source, key, trust_remote_code)
    check_local_files(source, key)
    return builder


def check_causal_lm(source: str, key: str) -> None:
    """A judge LLM: a causal LM that transformers builds without remote code."""
    config = read_config(source, key)
    archs, model_type = list(config.get("architectures") or []), config.get("model_type")
    custom = [a for a in archs if not hasattr(transformers, a)]
    if custom or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelUnavailableError(f"{key}={source}: architecture {archs or None} (model_type={model_type!r}) is "
                                    "not a causal LM transformers can build without remote code")
    check_local_files(source, key)
