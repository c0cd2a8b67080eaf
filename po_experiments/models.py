"""Models and tokenizers: the tiny offline Pythia-architecture model, or a real one by hub id / local path."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
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


def chat_template_ids(tokenizer, messages, *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a chat-templated conversation (transformers 5 returns a BatchEncoding where 4 returned ids)."""
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def load_tokenizer(cfg, source: str):
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
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


def all_cores() -> int:
    """Cores this process may run on (a SLURM allocation's CPUs), whatever else is running on them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_cores() -> int:
    """Cores not busy right now: with another process on one of two cores, 2 torch threads ran 30x slower."""
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, all_cores() - busy)


def set_threads(requested: int, deterministic: bool = False) -> int:
    """torch's CPU threads: `requested`, else the free cores, or with `deterministic` every core of the process.

    The thread count decides how CPU kernels split their reductions (LayerNorm's weight/bias gradients sum over the
    rows in per-thread blocks), so runs with different counts differ in the last bits and a 300-step SFT drifts
    apart by ~1e-3. The free-core count depends on the machine's load at start: two runs of the same command, or
    a run and its resumption, may get different counts. `deterministic` fixes it."""
    n = requested or (all_cores() if deterministic else free_cores())
    torch.set_num_threads(n)
    how = "" if requested else " (auto: every core, runtime.deterministic)" if deterministic else " (auto: free cores)"
    log.info("torch CPU threads: %d%s", n, how)
    return n
