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


def training_dtype(cfg) -> torch.dtype:
    """The dtype of weights that are trained (`cfg` = model config): float32 master weights (and so float32
    optimizer states), computed under autocast in `cfg.dtype`. Pure low-precision weights only when asked for:
    bf16 AdamW at the paper's learning rates keeps about 1 % of the fp32 parameter movement."""
    if cfg.dtype != "float32" and cfg.pure_low_precision:
        log.warning("model.pure_low_precision=true: weights and optimizer states in %s, no float32 master copy; "
                    "small updates (lr 5e-7) are mostly lost to rounding", cfg.dtype)
        return DTYPES[cfg.dtype]
    return torch.float32


def autocast_dtype(cfg) -> str | None:
    """'bfloat16' / 'float16' when training computes under autocast over float32 weights, else None. fp16 autocast
    needs CUDA (its loss scaler); on CPU a float16 model computes in float32 (warned)."""
    if cfg.dtype == "float32" or cfg.pure_low_precision:
        return None
    if cfg.dtype == "float16" and not torch.cuda.is_available():
        log.warning("model.dtype=float16 needs a GPU for mixed precision: computing in float32 on CPU")
        return None
    return cfg.dtype


def activation_checkpointing(cfg) -> bool:
    """Whether training recomputes activations in the backward (`cfg` = model config): on for real models by
    default (a layer's input kept instead of everything it saves: the memory that fits a paper model's batch)."""
    return cfg.path is not None if cfg.activation_checkpointing is None else bool(cfg.activation_checkpointing)


def tf32_available() -> bool:
    """TF32 matmuls (Ampere and later): float32 parts of mixed-precision training run on tensor cores."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def placement() -> dict:
    """`from_pretrained` keywords that place a model as it loads, so N ranks never hold N whole copies in host
    memory: on a GPU straight onto this rank's device (one shard at a time through host memory); under ZeRO-3 none,
    `zero.Init` partitions it over the ranks (the stage's TrainingArguments, built first, registered the config)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        deepspeed.init_distributed()  # zero.Init sizes its partitions by deepspeed.comm: join the job's group first
        return {}
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"device_map": {"": str(PartialState().device)}}
    return {}


def load_model(source, cfg, model_class=AutoModelForCausalLM, **kwargs) -> torch.nn.Module:
    """A model to train, in `training_dtype` (float32 master weights by default), placed as it loads (`placement`)."""
    return model_class.from_pretrained(source, dtype=training_dtype(cfg), trust_remote_code=cfg.trust_remote_code,
                                       **placement(), **kwargs)


GPU_WEIGHT_SHARE = 0.8  # weights may fill this share of one GPU's free memory; the rest is for generation's cache


def weight_bytes(model_dir, dtype: torch.dtype) -> int:
    """Bytes of a causal LM's weights in `dtype`, counted on the meta device from its config (nothing loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()


def load_for_inference(model_dir, dtype: str = "float32"):
    """A saved model and its tokenizer on the fastest device here, in eval mode (generation, sampling).

    On CUDA a model whose weights fit one GPU loads straight onto the current one; a larger one (a 70B local
    judge) is spread over every visible GPU (and host memory beyond them) with `device_map="auto"`, never moved
    whole onto one device. On CPU: float32, as before."""
    if not torch.cuda.is_available():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cpu").eval()
        return model, AutoTokenizer.from_pretrained(model_dir)
    dtype = DTYPES[dtype]
    device = torch.cuda.current_device()
    needed, free = weight_bytes(model_dir, dtype), torch.cuda.mem_get_info(device)[0]
    if needed <= GPU_WEIGHT_SHARE * free:
        device_map = {"": device}
    else:
        log.info("%s: %.1f GB of weights exceed %.0f %% of one GPU's free %.1f GB: device_map=auto over %d GPU(s)",
                 model_dir, needed / 1e9, 100 * GPU_WEIGHT_SHARE, free / 1e9, torch.cuda.device_count())
        device_map = "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map).eval()
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
