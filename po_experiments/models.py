"""Models and tokenizers: the tiny offline Pythia-architecture model, or a real one by hub id / local path."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from .data.synthetic import ASSISTANT, EOS, PAD, SPECIAL_TOKENS, UNK, USER
from .hub import resolve_pretrained

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Zephyr-style template (the paper's SFT recipe) for base models such as Pythia that ship without one.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: specials first, then the task's words."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
    )
    tok.padding_side = "left"  # generation pads on the left; TRL's collators pad as they need
    return tok


def build_tiny_model(arch, tokenizer: PreTrainedTokenizerFast, seed: int) -> GPTNeoXForCausalLM:
    """Randomly initialised GPTNeoX (Pythia's architecture) sized by `arch`."""
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def _source_hint(cfg) -> str:
    return (f"Point at a local copy with model.path=/path/to/{Path(cfg.path).name} (a folder with config.json, "
            "the weights and the tokenizer files), or run where the Hugging Face Hub can be reached.")


def resolve_model_source(cfg) -> str:
    """Fail within seconds, with a clear message, when a real model cannot be had here."""
    return resolve_pretrained(cfg.path, "model.path", _source_hint(cfg))


def chat_template_text(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    """A conversation rendered by the tokenizer's chat template, as text. Every stage renders through here (or
    `chat_template_ids`), so BOS and the thinking-mode choice baked into the template reach them all alike."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_template_ids(tokenizer, messages, *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a chat-templated conversation (transformers 5 returns a BatchEncoding where 4 returned ids).
    Like TRL, no special tokens are added on top of what the template writes (BOS comes from the template)."""
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# Marks a template whose choices (chat_template_kwargs) were fixed by `fix_chat_template` (idempotent).
_CHOICES_MARK = "{# po_experiments: chat_template_kwargs fixed here #}"
_PROBE = [{"role": "user", "content": "x"}]


def has_distinct_bos(tokenizer) -> bool:
    """Llama-3's <|begin_of_text|> yes; Pythia's (BOS == EOS == <|endoftext|>) and Qwen3's (no BOS) no."""
    bos = getattr(tokenizer, "bos_token", None)
    return bos is not None and bos != tokenizer.eos_token


def _jinja_literal(key: str, value) -> str:
    if not key.isidentifier():
        raise ValueError(f"model.chat_template_kwargs: {key!r} is not a template variable name")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    raise ValueError(f"model.chat_template_kwargs.{key}: only booleans, numbers and strings, got {value!r}")


def fix_chat_template(tokenizer, chat_template_kwargs: Mapping[str, Any] | None = None):
    """Give the tokenizer the chat format every stage uses, fixed in the template itself.

    - No template (a base model such as Pythia or Llama-3-8B): the Zephyr-style default.
    - A distinct BOS the template does not write: `{{ bos_token }}` first, so every chat-formatted sequence
      (SFT/DPO targets, evaluation, PPO and D' prompts) starts with it exactly once. Nothing is added where
      BOS == EOS (Pythia) or there is no BOS (Qwen3), so those ids do not change.
    - `chat_template_kwargs` (e.g. Qwen3's `enable_thinking: false`) become `{% set %}` lines at the top: they
      hold for every render, ours and TRL's SFT/DPO tokenisation alike, and travel with the tokenizer saved next
      to the SFT model to every later stage (a kwarg passed at render time is overridden).
    """
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    if not isinstance(template, str):
        raise ValueError("the tokenizer has several named chat templates; set model.path to one with a single one")
    if has_distinct_bos(tokenizer) and not _renders_bos_first(tokenizer, template):
        template = "{{ bos_token }}" + template
    choices = dict(chat_template_kwargs or {})
    if choices and not template.startswith(_CHOICES_MARK):
        header = "".join(f"{{% set {k} = {_jinja_literal(k, v)} %}}" for k, v in choices.items())
        template = _CHOICES_MARK + header + template
    tokenizer.chat_template = template
    return tokenizer


def _renders_bos_first(tokenizer, template: str) -> bool:
    """Whether the template itself writes BOS (Llama-3-Instruct's does)."""
    try:
        text = tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False)
    except Exception as err:  # a template that insists on other turns: leave it as its authors wrote it
        log.warning("chat template not checked for BOS (%s: %s)", type(err).__name__, err)
        return True
    return text.startswith(tokenizer.bos_token)


def load_tokenizer(cfg, source: str):
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs = getattr(cfg, "chat_template_kwargs", None)
    fix_chat_template(tok, OmegaConf.to_container(kwargs) if isinstance(kwargs, DictConfig) else kwargs)
    tok.padding_side = "left"
    return tok


def load_model(source: str, cfg) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[cfg.dtype],
                                                trust_remote_code=cfg.trust_remote_code)


def load_for_inference(model_dir, dtype: str = "float32"):
    """A saved model and its tokenizer on the fastest device here, in eval mode (generation, sampling)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[dtype] if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def free_cores() -> int:
    """Cores not busy right now: with another process on one of two cores, 2 torch threads ran 30x slower."""
    total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, total - busy)


def set_threads(requested: int) -> int:
    n = requested or free_cores()
    torch.set_num_threads(n)
    log.info("torch CPU threads: %d%s", n, " (auto: free cores)" if not requested else "")
    return n
