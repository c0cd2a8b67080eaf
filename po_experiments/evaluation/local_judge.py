"""Which alpaca_eval annotator judges, and the local judge for clusters without API access.

`eval.alpaca_eval.annotator` names any evaluator config of the alpaca_eval package (by default AlpacaEval 2's
`weighted_alpaca_eval_gpt4_turbo`, which needs OPENAI_API_KEY; the paper names no judge) or a folder with a
`configs.yaml` of one's own. `annotator=local` runs the judge LLM `eval.alpaca_eval.local_model` on this
machine: alpaca_eval's own classifier prompt (`alpaca_eval_clf_gpt4_turbo`, answer "m" or "M"), rendered through the judge's chat
template, decoded greedily, parsed by alpaca_eval's regex parser; alpaca_eval still shuffles the two outputs
and caches the annotations. The local judge answers with one identifier, so its verdicts are binary (like
`alpaca_eval_clf_gpt4_turbo`), not logprob-weighted.

Why not alpaca_eval's `huggingface_local_completions`: in alpaca_eval 0.6.6 it passes `load_in_8bit` to
`from_pretrained` whenever CUDA is absent, which transformers 5 rejects, and it feeds the prompt without the
judge's chat template. The decoder here is the evaluation's own batched greedy generation.
"""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import yaml

from ..errors import ConfigError, ModelUnavailableError

CLF_TEMPLATE = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)\n?<\|im_end\|>", re.S)
# The whole answer is one identifier: "m" prefers output_1, "M" output_2 (anything after it is ignored).
ANSWER = {1: r"(?s)\A\s*m(?![A-Za-z]).*", 2: r"(?s)\A\s*M(?![A-Za-z]).*"}


def evaluators_dir() -> Path:
    from alpaca_eval import constants

    return Path(constants.EVALUATORS_CONFIG_DIR)


def annotator_config(ae, workdir: Path) -> tuple[object, dict, str]:
    """(annotators_config for PairwiseAnnotator, extra keyword arguments, a name for files and tables)."""
    from .judges import short_name

    if ae.annotator != "local":
        check_packaged_annotator(ae.annotator)
        return ae.annotator, {}, short_name(ae.annotator)
    source = local_source(ae.local_model)
    name = f"local_{short_name(ae.local_model)}"
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    decoder = LocalDecoder(source, dtype=ae.local_dtype, batch_size=ae.local_batch_size)
    prompt = folder / "prompt.txt"
    prompt.write_text(render_prompt(decoder.tokenizer))
    config = {name: {"prompt_template": str(prompt.resolve()), "fn_completion_parser": "regex_parser",
                     "completion_parser_kwargs": {"outputs_to_match": ANSWER}, "batch_size": 1,
                     "pretty_name": f"local judge {ae.local_model}"}}
    (folder / "configs.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder, {"fn_completions": decoder, "completions_kwargs": {}}, name


def check_packaged_annotator(annotator: str) -> None:
    """Fail in seconds on an unknown annotator or an API one without its key, not after training."""
    path = Path(annotator)
    if not path.exists():
        path = evaluators_dir() / annotator
    if path.is_dir():
        path = path / "configs.yaml"
    if not path.is_file():
        known = sorted(p.name for p in evaluators_dir().iterdir() if (p / "configs.yaml").is_file())
        raise ConfigError(f"eval.alpaca_eval.annotator: {annotator!r} is neither an alpaca_eval evaluator config nor "
                          f"a folder with configs.yaml; use local (with eval.alpaca_eval.local_model) or one of: "
                          f"{', '.join(known)}")
    text = path.read_text()
    if "openai_completions" in text and not os.environ.get("OPENAI_API_KEY"):
        raise ModelUnavailableError(
            f"eval.alpaca_eval.annotator={annotator} asks the OpenAI API and OPENAI_API_KEY is not set. Set it, or "
            f"judge on this machine with eval.alpaca_eval.annotator=local eval.alpaca_eval.local_model=<judge LLM>")


def local_source(model: str | None) -> str:
    from ..hub import resolve_pretrained

    if not model:
        raise ConfigError("eval.alpaca_eval.local_model: annotator=local needs a judge model (hub id or folder)")
    return resolve_pretrained(model, "eval.alpaca_eval.local_model",
                              "Point eval.alpaca_eval.local_model at a local folder with the judge's config.json, "
                              "weights and tokenizer files.")


def render_prompt(tokenizer) -> str:
    """alpaca_eval's classifier prompt (ChatML in the package) in the judge's own chat format."""
    turns = [{"role": r, "content": c.strip()} for r, c in CHATML_TURN.findall((evaluators_dir() / CLF_TEMPLATE).read_text())]
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n".join(t["content"] for t in turns) + "\n"
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates without a system role: fold it into the user turn
        merged = [{"role": "user", "content": "\n\n".join(t["content"] for t in turns)}]
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    placeholders = re.findall(r"{([^ \s]+?)}", text)
    if sorted(placeholders) != ["instruction", "output_1", "output_2"]:
        raise ValueError(f"the judge's chat template changed alpaca_eval's placeholders: {placeholders}")
    return text


class LocalDecoder:
    """alpaca_eval `fn_completions`: greedy answers of a local judge LLM to the annotator's prompts."""

    def __init__(self, source: str, *, dtype: str, batch_size: int, max_new_tokens: int = 4):
        from ..models import load_for_inference

        self.source, self.batch_size, self.max_new_tokens = source, batch_size, max_new_tokens
        self.model, self.tokenizer = load_for_inference(source, dtype)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.__name__ = f"local_decoder({source})"  # alpaca_eval logs the decoder's name

    def __call__(self, prompts: list[str], **_) -> dict[str, list]:
        from ..generation.local import generate

        started = time.time()
        completions = generate(self.model, self.tokenizer, list(prompts), max_new_tokens=self.max_new_tokens,
                               batch_size=self.batch_size, desc="local judge")
        per_example = (time.time() - started) / max(1, len(prompts))
        return {"completions": completions, "price_per_example": [math.nan] * len(prompts),
                "time_per_example": [per_example] * len(prompts)}
