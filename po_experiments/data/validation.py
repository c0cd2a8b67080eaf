"""Row validation: find malformed rows, then stop with a report or drop them and log how many of each kind.

A check function maps a row to a list of `(field, problem)` pairs (empty when the row is fine). A problem is
a fixed phrase, its *kind*, optionally followed by details in parentheses, e.g.
`"too long (1500 tokens > max_length 1024)"`: reports count rows per field and kind, and show the details
only in the first few examples. The building blocks below (`check_text`, `check_messages`, `check_length`)
cover the schemas in DESIGN 2; `paper.py` combines them per data set.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import datasets

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

    @property
    def kept(self) -> int:
        return self.total - self.dropped

    def lines(self) -> list[str]:
        """Counts per kind, then the examples, each line self-contained for grep."""
        counts = [f"  {n} row(s): {key}" for key, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        return counts + [f"  {self.source} {p}" for p in self.examples]


def validate_rows(dataset: datasets.Dataset, check_fn: CheckFn, *, source: str,
                  on_invalid: OnInvalid | str) -> tuple[datasets.Dataset, ValidationReport]:
    """Check every row; with `fail` raise DataError if any is bad, with `skip` drop the bad ones.

    The whole data set is checked before failing, so one run shows how many rows are bad and of which
    kinds, instead of one fix-and-rerun cycle per row.
    """
    on_invalid = OnInvalid(on_invalid)
    report = ValidationReport(source=source, total=len(dataset))
    counts: Counter[str] = Counter()
    for i, row in enumerate(dataset):
        problems = check_fn(row)
        if not problems:
            continue
        report.bad_rows.append(i)
        counts.update({f"{f}: {kind(p)}" for f, p in problems})  # a set: one count per row and kind
        if len(report.bad_rows) <= N_EXAMPLES:
            report.examples.extend(RowProblem(i, f, p) for f, p in problems)
    report.counts = dict(counts)
    if not report.bad_rows:
        log.info("%s: all %d rows valid", source, report.total)
        return dataset, report
    if on_invalid is OnInvalid.fail:
        raise DataError("\n".join(
            [f"{source}: {len(report.bad_rows)} of {report.total} rows are invalid:", *report.lines(),
             "Fix the data, or set data.on_invalid=skip to drop invalid rows."]))
    return _drop(dataset, report), report


def _drop(dataset: datasets.Dataset, report: ValidationReport) -> datasets.Dataset:
    bad = set(report.bad_rows)
    report.dropped = len(bad)
    log.warning("\n".join([_dropped_line(report), *report.lines()]))
    if report.kept == 0:
        raise DataError(f"{report.source}: no valid rows left after dropping {report.dropped} invalid row(s); "
                        "see the log above for the problems")
    return dataset.select([i for i in range(report.total) if i not in bad])


def _dropped_line(report: ValidationReport) -> str:
    return (f"{report.source}: dropped {report.dropped} of {report.total} rows as invalid "
            f"(kept {report.kept}; data.on_invalid=skip)")


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
