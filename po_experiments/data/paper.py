"""The paper's data sets (DESIGN 2) in TRL's formats, every row validated before use.

- `load_sft`: UltraChat-200k -> `messages` (TRL's conversational language-modelling format).
- `load_preferences`: UltraFeedback-binarized -> `prompt` (the turns before the final assistant turn),
  `chosen`/`rejected` (each [the final assistant turn]): TRL's conversational preference format; the scores
  are kept.
- `load_questions`: HH-RLHF helpful-base (D', the held-out questions) -> `prompt` (messages ending with a
  user turn) and `text` (the same question as the raw `\n\nHuman: ...` string).
- `load_instructions`: AlpacaEval's 805 instructions -> `instruction`, `dataset`.

With a tokenizer, lengths are measured after the chat template against `cfg.max_length` (the model's
max_length, what TRL truncates to):
- training rows (SFT dialogues, preference pairs) longer than that are kept: SFTTrainer and DPOTrainer truncate
  them (keep_start); the share is logged and in the validation report. A pair whose prompt alone fills
  max_length is dropped and counted, as DPOTrainer drops it, so DPO, PPO and the G analysis read the same pairs.
- a question or instruction longer than that is an invalid row (`data.on_invalid`: skip drops and counts it,
  fail stops): cutting a question would ask something else, and these sets are short (AlpacaEval's longest
  instruction has ~1.9k characters, HH-RLHF's questions a few turns).
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Callable, Mapping, Sequence

import datasets
from datasets import Features, Value

from ..config import PaperDataConfig
from ..errors import DataError
from .sources import COLUMNS, describe, load_source
from .validation import (MISSING, Problem, check_length, check_messages, check_prompt_fits, check_text,
                         note_truncation, validate_rows)

MESSAGES = [{"role": Value("string"), "content": Value("string")}]  # a list of {role, content}
SCORES = ("score_chosen", "score_rejected")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# --------------------------------------------------------------------------------------------- loaders


def load_sft(cfg: PaperDataConfig, tokenizer=None) -> datasets.Dataset:
    """UltraChat-200k dialogues as `messages`, each ending with an assistant turn."""
    def check(row):
        return check_messages(row, "messages") or note_truncation(tokenizer, row["messages"], "messages",
                                                                  cfg.max_length)

    ds = _load_valid(cfg, "sft", check, tokenizer)
    return ds.map(lambda row: {"messages": _clean(row["messages"])}, remove_columns=ds.column_names,
                  features=Features({"messages": MESSAGES}))


def load_preferences(cfg: PaperDataConfig, tokenizer=None) -> datasets.Dataset:
    """UltraFeedback pairs as TRL conversational preferences: shared `prompt` turns, one-turn `chosen`/`rejected`."""
    ds = _load_valid(cfg, "preferences", lambda row: _check_preference(row, tokenizer, cfg.max_length), tokenizer)
    scores = [s for s in SCORES if s in ds.column_names]  # a user's mirror may lack them

    def to_trl(row):
        return {"prompt": _clean(row["chosen"][:-1]), "chosen": _clean(row["chosen"][-1:]),
                "rejected": _clean(row["rejected"][-1:]), **{s: float(row[s]) for s in scores}}

    features = Features({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES,
                         **{s: Value("float64") for s in scores}})
    return ds.map(to_trl, remove_columns=ds.column_names, features=features)


def load_questions(cfg: PaperDataConfig, tokenizer=None) -> datasets.Dataset:
    """HH-RLHF questions (everything before the last assistant answer of `chosen`) as `prompt` and `text`."""
    ds = _load_valid(cfg, "questions", lambda row: _check_question(row, tokenizer, cfg.max_length), tokenizer)
    return ds.map(lambda row: {"prompt": hh_question(row["chosen"]), "text": hh_question_text(row["chosen"])},
                  remove_columns=ds.column_names, features=Features({"prompt": MESSAGES, "text": Value("string")}))


def load_instructions(cfg: PaperDataConfig, tokenizer=None) -> datasets.Dataset:
    """AlpacaEval's instructions with the subset each comes from (`dataset`)."""
    def check(row):
        problems = check_text(row, "instruction") + check_text(row, "dataset")
        return problems or check_length(tokenizer, [{"role": "user", "content": row["instruction"]}], "instruction",
                                        cfg.max_length, add_generation_prompt=True)

    ds = _load_valid(cfg, "instructions", check, tokenizer)
    return ds.map(lambda row: {"instruction": row["instruction"], "dataset": row["dataset"]},
                  remove_columns=ds.column_names,  # declared types, whatever mixed types the file held
                  features=Features({"instruction": Value("string"), "dataset": Value("string")}))


def _load_valid(cfg: PaperDataConfig, what: str, check: Callable[[Mapping[str, Any]], list[Problem]],
                tokenizer) -> datasets.Dataset:
    """Load `cfg.<what>`, insist on its columns (a wrong file fails once, not once per row), validate rows."""
    src = getattr(cfg, what)
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{what} data: the tokenizer has no chat_template, so lengths cannot be checked; "
                        "use a chat model's tokenizer or set one")
    ds = load_source(src, what, cfg.on_invalid)
    missing = [c for c in COLUMNS[what] if c not in ds.column_names]
    if missing:
        raise DataError(f"{what} data {describe(src)}: no column(s) {', '.join(missing)} (found: "
                        f"{', '.join(ds.column_names)}); data.{what}.path must hold the schema of DESIGN 2")
    ds, _ = validate_rows(ds, check, source=f"{what} ({describe(src)})", on_invalid=cfg.on_invalid,
                          num_proc=cfg.num_proc, memo_key=f"{what}|max_length={cfg.max_length}|{_identity(tokenizer)}")
    return ds


def _identity(tokenizer) -> str:
    """What of a tokenizer decides the checks' findings (for reusing them within a process): its template and its
    tokenisation, not its folder (DPO reads the SFT model's copy, the G analysis the trained policy's)."""
    if tokenizer is None:
        return "no tokenizer"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenisation = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}|{len(tokenizer)}"
    return hashlib.sha1(f"{tokenizer.chat_template}\0{tokenisation}".encode()).hexdigest()


def _clean(msgs: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Just role and content (Arrow fills keys seen in other rows with None)."""
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# --------------------------------------------------------------------------------------------- UltraFeedback


def _check_preference(row: Mapping[str, Any], tokenizer, max_length: int) -> list[Problem]:
    problems = (check_text(row, "prompt") + check_messages(row, "chosen") + check_messages(row, "rejected")
                + _check_scores(row))
    if problems:  # the pair checks below assume well-formed message lists
        return problems
    chosen, rejected = _turns(row["chosen"]), _turns(row["rejected"])
    if chosen == rejected:
        return [("chosen", "identical to 'rejected'")]
    if chosen[:-1] != rejected[:-1]:
        return [("rejected", "different prompt from 'chosen' (the turns before the last answer differ)")]
    users = [content for role, content in chosen[:-1] if role == "user"]
    if not users:
        return [("chosen", "no user turn before the assistant's answer")]
    if users[-1].strip() != row["prompt"].strip():
        return [("prompt", "does not match the last user turn of 'chosen'")]
    prompt = _clean(row["chosen"][:-1])
    return (check_prompt_fits(tokenizer, prompt, "prompt", max_length)
            or note_truncation(tokenizer, prompt + _clean(row["chosen"][-1:]), "chosen", max_length)
            + note_truncation(tokenizer, prompt + _clean(row["rejected"][-1:]), "rejected", max_length))


def _turns(msgs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in msgs]


def _check_scores(row: Mapping[str, Any]) -> list[Problem]:
    """Scores are optional columns; where present they must be numbers with chosen >= rejected."""
    present = [s for s in SCORES if s in row]
    problems = []
    for name in present:
        v = row[name]
        if v is None:
            problems.append((name, MISSING))
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            problems.append((name, f"not a number ({v!r})"))
    if not problems and len(present) == 2 and row["score_chosen"] < row["score_rejected"]:
        detail = f"{row['score_chosen']} < {row['score_rejected']}"
        problems.append(("score_chosen", f"lower than score_rejected ({detail})"))
    return problems


# --------------------------------------------------------------------------------------------- HH-RLHF


def hh_question_text(text: str) -> str:
    """The question part of an HH-RLHF dialogue: everything before its last `\\n\\nAssistant:`."""
    if not isinstance(text, str):
        raise ValueError(f"not a string ({type(text).__name__})")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {ASSISTANT!r} marker")
    return text[:cut]


def hh_question(text: str) -> list[dict]:
    """An HH-RLHF dialogue's question part as user/assistant messages ending with a user turn.

    Raises ValueError naming what is malformed. Consecutive turns of one speaker (a few HH dialogues
    have two Assistant turns in a row) are joined into one message, since chat templates expect turns to
    alternate.
    """
    question = hh_question_text(text)
    if HUMAN not in question:
        raise ValueError(f"no {HUMAN!r} turn before the last {ASSISTANT!r}")
    pieces = _HH_TURN.split(question)  # [before the first marker, speaker, content, speaker, content, ...]
    if pieces[0].strip():
        raise ValueError(f"text before the first {HUMAN!r} marker ({pieces[0][:40]!r})")
    turns: list[dict] = []
    for j, (speaker, content) in enumerate(zip(pieces[1::2], pieces[2::2])):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if not content:
            raise ValueError(f"empty turn (turn {j}, {speaker})")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    if turns[0]["role"] != "user":
        raise ValueError("dialogue starts with an assistant turn")
    if turns[-1]["role"] != "user":
        raise ValueError(f"question ends with an assistant turn (a {HUMAN!r} marker is missing or written inline)")
    return turns


def _check_question(row: Mapping[str, Any], tokenizer, max_length: int) -> list[Problem]:
    problems = check_text(row, "chosen")
    if problems:
        return problems
    try:
        prompt = hh_question(row["chosen"])
    except ValueError as e:
        return [("chosen", str(e))]
    return check_length(tokenizer, prompt, "chosen", max_length, add_generation_prompt=True)
