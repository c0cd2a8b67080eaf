"""Row validation: find malformed rows, then stop with a report or drop them and log how many of each kind.

A check function maps a row to a list of `(field, problem)` pairs (empty when the row is fine). A problem is
a fixed phrase, its *kind*, optionally followed by details in parentheses, e.g.
`"too long (1500 tokens > max_length 1024)"`: reports count rows per field and kind, and show the details
only in the first few examples. The building blocks below (`check_text`, `check_messages`, `check_length`)
cover the schemas in DESIGN 2; `paper.py` combines them per data set.

Two kinds of finding are not malformed rows: `truncated` (a training row longer than max_length: kept, TRL
truncates it; the share is logged and reported) and `prompt fills max_length` (a preference pair whose prompt
alone reaches max_length: dropped whatever `on_invalid` says, as TRL's DPOTrainer drops it, and counted).

The checks run once per job: on rank 0 only (the others get its findings), in `num_proc` processes
(`datasets.map`), and once per data set and tokenizer in a process (a second loader call reuses them).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import datasets

from .. import distributed
from ..config import OnInvalid
from ..errors import DataError

log = logging.getLogger("po_experiments.data")

Problem = tuple[str, str]  # (field, problem)
CheckFn = Callable[[Mapping[str, Any]], list[Problem]]

ROLES = ("system", "user", "assistant")
N_EXAMPLES = 5  # bad rows quoted in full in an error or log line

# Problem kinds (the fixed part of a problem string).
MISSING = "missing"
NOT_STRING = "not a string"
EMPTY = "empty"
NOT_MESSAGES = "not a list of {role, content} messages"
EMPTY_CONTENT = "empty content"
NON_STRING_CONTENT = "non-string content"
UNKNOWN_ROLE = "unknown role"
TOO_LONG = "too long"
TEMPLATE_FAILED = "chat template failed"
TRUNCATED = "truncated"  # kept: longer than max_length, TRL cuts it (keep_start)
PROMPT_FILLS = "prompt fills max_length"  # dropped in any case: TRL's DPOTrainer drops such pairs too
NOTE_KINDS = {TRUNCATED}
DISCARD_KINDS = {PROMPT_FILLS}

ROWS_PER_PROCESS = 1000  # fewer rows than this per process: checked in this process (a pool costs seconds)


def kind(problem: str) -> str:
    """The fixed phrase of a problem, without the details in parentheses."""
    return problem.split(" (", 1)[0]


@dataclass(frozen=True)
class RowProblem:
    index: int  # 0-based position of the row in the source
    field: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.index}, field '{self.field}': {self.problem}"


@dataclass
class ValidationReport:
    source: str
    total: int
    bad_rows: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # "field: kind" -> rows with that problem
    examples: list[RowProblem] = field(default_factory=list)  # every problem of the first bad rows
    dropped: int = 0  # rows removed (only with on_invalid=skip)
    truncated: int = 0  # valid rows longer than max_length: kept, truncated in training
    truncated_counts: dict[str, int] = field(default_factory=dict)  # "field" -> rows with that field truncated
    discarded: int = 0  # valid rows dropped whatever on_invalid says (PROMPT_FILLS)

    @property
    def kept(self) -> int:
        return self.total - self.dropped - self.discarded

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.total if self.total else 0.0

    def lines(self) -> list[str]:
        """Counts per kind, then the examples, each line self-contained for grep."""
        counts = [f"  {n} row(s): {key}" for key, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        return counts + [f"  {self.source} {p}" for p in self.examples]


def validate_rows(dataset: datasets.Dataset, check_fn: CheckFn, *, source: str, on_invalid: OnInvalid | str,
                  num_proc: Optional[int] = None, memo_key: Optional[str] = None,
                  ) -> tuple[datasets.Dataset, ValidationReport]:
    """Check every row; with `fail` raise DataError if any is bad, with `skip` drop the bad ones.

    The whole data set is checked before failing, so one run shows how many rows are bad and of which
    kinds, instead of one fix-and-rerun cycle per row. `memo_key` (what, besides the rows, decides the
    findings: the check, max_length, the tokenizer) lets a second call in this process reuse them.
    """
    on_invalid = OnInvalid(on_invalid)
    findings = row_findings(dataset, check_fn, num_proc=num_proc, memo_key=memo_key)
    report = ValidationReport(source=source, total=len(dataset))
    counts: Counter[str] = Counter()
    truncated: Counter[str] = Counter()
    discard = []
    for i in sorted(findings):
        problems = [(f, p) for f, p in findings[i] if kind(p) not in NOTE_KINDS | DISCARD_KINDS]
        if not problems:
            notes = findings[i]
            truncated.update({f for f, p in notes if kind(p) == TRUNCATED})
            report.truncated += any(kind(p) == TRUNCATED for _, p in notes)
            if any(kind(p) in DISCARD_KINDS for _, p in notes):
                discard.append(i)
                counts.update({f"{f}: {kind(p)}" for f, p in notes if kind(p) in DISCARD_KINDS})
            continue
        report.bad_rows.append(i)
        counts.update({f"{f}: {kind(p)}" for f, p in problems})  # a set: one count per row and kind
        if len(report.bad_rows) <= N_EXAMPLES:
            report.examples.extend(RowProblem(i, f, p) for f, p in problems)
    report.counts, report.truncated_counts = dict(counts), dict(truncated)
    if report.bad_rows and on_invalid is OnInvalid.fail:
        raise DataError("\n".join(
            [f"{source}: {len(report.bad_rows)} of {report.total} rows are invalid:", *report.lines(),
             "Fix the data, or set data.on_invalid=skip to drop invalid rows."]))
    _log_truncation(report, findings)
    if not report.bad_rows and not discard:
        _info("%s: all %d rows valid", source, report.total)
        return dataset, report
    return _drop(dataset, report, discard), report


def _info(msg: str, *args) -> None:
    if distributed.is_main():  # every rank holds the same findings: one log line per job
        log.info(msg, *args)


def _log_truncation(report: ValidationReport, findings: dict[int, list[Problem]]) -> None:
    if not report.truncated:
        return
    example = next(p for i in sorted(findings) for _, p in findings[i] if kind(p) == TRUNCATED)
    per_field = ", ".join(f"{f}: {n}" for f, n in sorted(report.truncated_counts.items()))
    _info("%s: %d of %d rows (%.1f %%) are longer than max_length and will be truncated in training (%s; e.g. %s)",
          report.source, report.truncated, report.total, 100 * report.truncated_share, per_field, example)


# --------------------------------------------------------------------------------------------- checking, once


_MEMO: dict[tuple[str, str], dict[int, list[Problem]]] = {}


def default_num_proc() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def row_findings(dataset: datasets.Dataset, check_fn: CheckFn, *, num_proc: Optional[int] = None,
                 memo_key: Optional[str] = None) -> dict[int, list[Problem]]:
    """row index -> its findings (rows without any left out): rank 0 checks (or reuses what it found before for
    the same rows and `memo_key`) while the others wait, then every rank gets rank 0's findings. Every rank
    takes this same collective step on every call, so a rank that remembers and one that does not never part."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    key = (fingerprint, memo_key) if fingerprint is not None and memo_key is not None else None

    def on_main() -> dict[int, list[Problem]]:
        if key not in _MEMO:
            found = _check_all(dataset, check_fn, num_proc or default_num_proc())
            if key is None:
                return found
            _MEMO[key] = found
        return _MEMO[key]

    return distributed.main_first(on_main)


def _check_all(dataset: datasets.Dataset, check_fn: CheckFn, num_proc: int) -> dict[int, list[Problem]]:
    procs = min(num_proc, len(dataset) // ROWS_PER_PROCESS)
    if procs <= 1:
        found = (check_fn(row) for row in dataset)
        return {i: list(p) for i, p in enumerate(found) if p}

    def check_batch(batch: dict[str, list]) -> dict[str, list[str]]:
        rows = (dict(zip(batch, values)) for values in zip(*batch.values()))
        return {"findings": [json.dumps(found) if (found := check_fn(row)) else "" for row in rows]}

    # In memory: nothing written to the datasets cache, so concurrent jobs on one data file cannot mix findings.
    out = dataset.map(check_batch, batched=True, batch_size=200, num_proc=procs, remove_columns=dataset.column_names,
                      features=datasets.Features({"findings": datasets.Value("string")}), keep_in_memory=True,
                      load_from_cache_file=False, new_fingerprint=f"validation-{uuid.uuid4().hex}",
                      desc="validating rows")
    return {i: [tuple(p) for p in json.loads(f)] for i, f in enumerate(out["findings"]) if f}


def _drop(dataset: datasets.Dataset, report: ValidationReport, discard: list[int]) -> datasets.Dataset:
    drop = set(report.bad_rows) | set(discard)
    report.dropped, report.discarded = len(report.bad_rows), len(discard)
    if distributed.is_main():
        log.warning("\n".join([_dropped_line(report), *report.lines()]))
    if report.kept == 0:
        raise DataError(f"{report.source}: no valid rows left after dropping {len(drop)} row(s); "
                        "see the log above for the problems")
    return dataset.select([i for i in range(report.total) if i not in drop])


def _dropped_line(report: ValidationReport) -> str:
    why = [f"{report.dropped} invalid, data.on_invalid=skip"] if report.dropped else []
    if report.discarded:
        why.append(f"{report.discarded} whose prompt alone fills max_length, as TRL's DPOTrainer drops them")
    return (f"{report.source}: dropped {report.dropped + report.discarded} of {report.total} rows "
            f"({'; '.join(why)}; kept {report.kept})")


# --------------------------------------------------------------------------------------------- checks


def check_text(row: Mapping[str, Any], name: str) -> list[Problem]:
    """A non-empty string field (HH dialogues, UltraFeedback's prompt, AlpacaEval's instruction)."""
    value = row.get(name)
    if value is None:
        return [(name, MISSING)]
    if not isinstance(value, str):
        return [(name, f"{NOT_STRING} ({type(value).__name__})")]
    if not value.strip():
        return [(name, EMPTY)]
    return []


def check_messages(row: Mapping[str, Any], name: str, *, last_role: Optional[str] = "assistant") -> list[Problem]:
    """A list of {role, content} dicts with known roles and non-empty string content, ending with `last_role`."""
    msgs = row.get(name)
    if msgs is None:
        return [(name, MISSING)]
    if not isinstance(msgs, list):
        return [(name, f"{NOT_MESSAGES} (got {type(msgs).__name__})")]
    odd = [m for m in msgs if not isinstance(m, Mapping)]
    if odd:
        return [(name, f"{NOT_MESSAGES} (a message is a {type(odd[0]).__name__})")]
    if not msgs:
        return [(name, f"{EMPTY} (no messages)")]
    for j, m in enumerate(msgs):
        problem = _message_problem(m)
        if problem:
            return [(name, _with_detail(problem, f"message {j}"))]
    if last_role and msgs[-1].get("role") != last_role:
        return [(name, f"last message not from the {last_role} (it is from the {msgs[-1].get('role')})")]
    return []


def _message_problem(m: Mapping[str, Any]) -> Optional[str]:
    role, content = m.get("role"), m.get("content")
    if role is None:
        return f"{MISSING} role"
    if content is None:
        return f"{MISSING} content"
    if role not in ROLES:
        return f"{UNKNOWN_ROLE} ({role!r})"
    if not isinstance(content, str):
        return f"{NON_STRING_CONTENT} ({type(content).__name__})"
    if not content.strip():
        return EMPTY_CONTENT
    return None


def _with_detail(problem: str, detail: str) -> str:
    """Add `detail` inside the problem's parentheses (or open them), keeping the kind intact."""
    return f"{problem[:-1]}, {detail})" if problem.endswith(")") else f"{problem} ({detail})"


def count_tokens(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> int:
    """Length of the chat-templated conversation in tokens (what training and generation will see)."""
    from ..models import chat_template_ids  # late: models imports the data package

    return len(chat_template_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt))


def check_length(tokenizer, messages: Sequence[Mapping[str, str]], name: str, max_length: int, *,
                 add_generation_prompt: bool = False) -> list[Problem]:
    """`name` is too long when its chat-templated tokens exceed `max_length` (no tokenizer: no check)."""
    if tokenizer is None:
        return []
    try:
        n = count_tokens(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # e.g. a template that insists on alternating roles
        return [(name, f"{TEMPLATE_FAILED} ({type(e).__name__}: {e})")]
    return [(name, f"{TOO_LONG} ({n} tokens > max_length {max_length})")] if n > max_length else []


def note_truncation(tokenizer, messages: Sequence[Mapping[str, str]], name: str, max_length: int) -> list[Problem]:
    """A training sequence longer than `max_length` is kept and truncated by TRL (a note, not a problem)."""
    if tokenizer is None:
        return []
    try:
        n = count_tokens(tokenizer, messages)
    except Exception as e:
        return [(name, f"{TEMPLATE_FAILED} ({type(e).__name__}: {e})")]
    return [(name, f"{TRUNCATED} ({n} tokens > max_length {max_length})")] if n > max_length else []


def check_prompt_fits(tokenizer, prompt: Sequence[Mapping[str, str]], name: str, max_length: int) -> list[Problem]:
    """A preference prompt (with its generation prompt) that alone reaches `max_length` leaves no response token
    after truncation: TRL's DPOTrainer drops such pairs, and so do we, for every stage that reads the pairs."""
    if tokenizer is None:
        return []
    try:
        n = count_tokens(tokenizer, prompt, add_generation_prompt=True)
    except Exception as e:
        return [(name, f"{TEMPLATE_FAILED} ({type(e).__name__}: {e})")]
    return [(name, f"{PROMPT_FILLS} ({n} tokens >= {max_length})")] if n >= max_length else []
