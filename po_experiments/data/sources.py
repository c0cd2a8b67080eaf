"""Load one data set from a local file/folder or the Hugging Face Hub, failing fast and clearly when it can't.

`SourceConfig.path` (a .json/.jsonl/.jsonl.gz/.json.gz/.parquet file, or a folder of them) wins over
`hub_id`, so users with a mirror or an air-gapped cluster point at their copy with
`data.<what>.path=/path/to/file.jsonl`. Without a path the hub is used; when it cannot be reached only the
local HF datasets cache is tried, in offline mode, so a missing data set fails in seconds instead of
retrying the network for minutes.

`preflight_sources(cfg)` opens every source a run will use (a few rows, or the schema) before any training, so
a missing file, a wrong schema or a hub repo that cannot be loaded fails in seconds, not after hours of SFT.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import datasets

from ..config import SourceConfig
from ..errors import DataError
from ..hub import hub_reachable

log = logging.getLogger(__name__)

# Longest suffixes first so "x.jsonl.gz" is not taken for a ".gz" of unknown kind.
_BUILDERS = {
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
_KINDS = "a .json, .jsonl, .jsonl.gz, .json.gz or .parquet file, or a folder of them"

# The columns each source must have (DESIGN 2); the loaders in paper.py insist on the same.
COLUMNS = {"sft": ("messages",), "preferences": ("prompt", "chosen", "rejected"), "questions": ("chosen",),
           "instructions": ("instruction", "dataset")}

# Hub repos that only a loading script reads (datasets >= 4 refuses scripts): the data file to point at instead.
SCRIPT_DATASETS = {
    "tatsu-lab/alpaca_eval": ("alpaca_eval.json",
                              "https://huggingface.co/datasets/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval.json"),
}
_PEEK_BYTES = 4 << 20  # enough for the first row of any of the paper's sets


def describe(src: SourceConfig) -> str:
    """A short name for messages: the local path, or the hub id with its split and data_dir."""
    if src.path:
        return str(src.path)
    where = f"split {src.split}" + (f", data_dir {src.data_dir}" if src.data_dir else "")
    return f"{src.hub_id} ({where})"


def load_source(src: SourceConfig, what: str, on_invalid: str = "fail") -> datasets.Dataset:
    """The rows of one source as a `datasets.Dataset`, truncated to `max_rows`.

    `what` is the key under `data.` (sft, preferences, questions, instructions); errors name
    `data.<what>.path` so the user knows which setting to change. Local files are one split: `split`
    and `data_dir` only apply to the hub. A JSON-lines line that is not JSON (a truncated download) is named
    with its file and line number: `on_invalid=fail` stops there, `skip` drops the line and logs it.
    """
    if src.max_rows is not None and src.max_rows <= 0:
        raise DataError(f"data.{what}.max_rows must be > 0 (or null for all rows), got {src.max_rows}")
    on_invalid = getattr(on_invalid, "value", on_invalid)
    ds = _load_local(Path(src.path).expanduser(), what, on_invalid) if src.path else _load_hub(src, what)
    known = getattr(src, "rows", None)
    if known is not None and len(ds) != known:  # the dry-run plan counted steps from `rows`
        log.warning("data.%s: %s has %d rows, data.%s.rows says %d: the plan's step counts used %d (set "
                    "data.%s.rows=%d to plan with this copy)", what, describe(src), len(ds), what, known, known,
                    what, len(ds))
    if src.max_rows is not None and len(ds) > src.max_rows:
        ds = ds.select(range(src.max_rows))  # the first N rows, so row indices still match the source
    return ds


# --------------------------------------------------------------------------------------------- local files


def _builder_for(path: Path) -> Optional[str]:
    name = path.name.lower()
    return next((b for suffix, b in _BUILDERS.items() if name.endswith(suffix)), None)


def _data_files(path: Path, what: str) -> tuple[str, list[str]]:
    """(datasets builder name, files) for a file or a folder; one builder, since one load reads them all."""
    if not path.exists():
        raise DataError(f"{what} data: {path} does not exist; set data.{what}.path to {_KINDS}")
    if path.is_dir():
        # Hidden entries (.cache, .git) are never data.
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder_for(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{what} data: folder {path} holds no data files; data.{what}.path must be {_KINDS}")
    else:
        files = [path]
    builders = {_builder_for(f) for f in files}
    if None in builders:
        raise DataError(f"{what} data: {path} has an unknown extension; data.{what}.path must be {_KINDS}")
    if len(builders) > 1:
        raise DataError(f"{what} data: folder {path} mixes JSON and parquet files; keep one kind per folder")
    return builders.pop(), [str(f) for f in files]


def _load_local(path: Path, what: str, on_invalid: str = "fail") -> datasets.Dataset:
    builder, files = _data_files(path, what)
    try:
        # The json builder also reads a top-level JSON list (AlpacaEval's file) and gzip-compressed files.
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # a parse error deep in pyarrow: find the line, or say which file and keep the cause
        bad = {f: lines for f in files if builder == "json" and (lines := _bad_lines_or_none(Path(f)))}
        if not bad:
            raise DataError(f"{what} data: could not read {path} ({type(e).__name__}: {e})") from e
        if on_invalid != "skip":
            raise DataError(_bad_lines_message(what, bad, "could not read") + "\nFix or download the file again, "
                            "or set data.on_invalid=skip to drop these lines") from e
        log.warning("%s (data.on_invalid=skip)", _bad_lines_message(what, bad, "skipped lines that are not JSON in"))
        files = [str(_without_lines(Path(f), bad[f])) if f in bad else f for f in files]
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as e2:
            raise DataError(f"{what} data: could not read {path} after dropping the lines that are not JSON "
                            f"({type(e2).__name__}: {e2})") from e2


BadLine = tuple[int, str]  # (1-based line number, why it is not JSON)
N_LINES_SHOWN = 5


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _bad_lines_or_none(path: Path) -> list[BadLine]:
    """`bad_json_lines`, or none where the file cannot even be read as text (a cut gzip stream, not UTF-8):
    then the loader's own error says what is wrong."""
    try:
        return bad_json_lines(path)
    except (OSError, EOFError, UnicodeError):
        return []


def bad_json_lines(path: Path) -> list[BadLine]:
    """The lines of a JSON-lines file that are not a JSON object (blank lines are allowed). A top-level JSON list
    is one document: its first error, with the line the parser stopped at."""
    with _open_text(path) as f:
        first = f.read(1 << 16).lstrip()[:1]
    if first == "[":
        try:
            with _open_text(path) as f:
                json.load(f)
            return []
        except json.JSONDecodeError as e:
            return [(e.lineno, f"the JSON list is not valid JSON: {e.msg} (column {e.colno})")]
    bad = []
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                truncated = "" if line.endswith("\n") else "; the file's last line, cut short?"
                bad.append((number, f"{e.msg} at column {e.colno}{truncated}"))
                continue
            if not isinstance(row, dict):
                bad.append((number, f"a JSON {type(row).__name__}, not an object"))
    return bad


def _bad_lines_message(what: str, bad: dict[str, list[BadLine]], verb: str) -> str:
    parts = []
    for file, lines in bad.items():
        shown = "; ".join(f"line {n}: {why}" for n, why in lines[:N_LINES_SHOWN])
        more = f"; and {len(lines) - N_LINES_SHOWN} more" if len(lines) > N_LINES_SHOWN else ""
        parts.append(f"{what} data: {verb} {file}: {len(lines)} line(s) not JSON ({shown}{more})")
    return "\n".join(parts)


def _without_lines(path: Path, bad: list[BadLine]) -> Path:
    """A copy of a JSON-lines file without its bad lines, in the datasets cache under a name that depends on the
    file's path, size and modification time (so the next load reuses the copy and its Arrow cache)."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = Path(datasets.config.HF_DATASETS_CACHE) / "po_experiments_valid_lines" / f"{digest}.jsonl"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    skip = {n for n, _ in bad}
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    with _open_text(path) as src, open(tmp, "w", encoding="utf-8") as out:
        for number, line in enumerate(src, start=1):
            if number not in skip:
                out.write(line if line.endswith("\n") else line + "\n")
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------------------------- the hub


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make `datasets` skip the network and look only in its cache (its flag is read once, at import)."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def script_dataset_error(hub_id: str, what: str) -> DataError:
    """datasets >= 4 cannot load a repo that needs a loading script: say which file to download and what to set."""
    name, url = SCRIPT_DATASETS.get(hub_id, ("its data file (the .json/.parquet the script reads)",
                                             f"https://huggingface.co/datasets/{hub_id}/tree/main"))
    file = name if hub_id in SCRIPT_DATASETS else "file.json"
    return DataError(f"{what} data: {hub_id} is a script dataset, which datasets {datasets.__version__} no longer "
                     f"loads (\"Dataset scripts are no longer supported\"). Download {name} ({url}) and set "
                     f"data.{what}.path=/path/to/{file}")


def _hub_hint(what: str) -> str:
    return f"point at a local copy with data.{what}.path=/path/to/file.jsonl ({_KINDS}, in the hub's schema)"


def _load_hub(src: SourceConfig, what: str) -> datasets.Dataset:
    if not src.hub_id:
        raise DataError(f"{what} data: set data.{what}.path (a local file) or data.{what}.hub_id")
    if src.hub_id in SCRIPT_DATASETS:
        raise script_dataset_error(src.hub_id, what)
    local_hint = _hub_hint(what)
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _hub_offline():
            return datasets.load_dataset(src.hub_id, data_dir=src.data_dir, split=src.split)
    except Exception as e:
        if "scripts are no longer supported" in str(e):
            raise script_dataset_error(src.hub_id, what) from e
        if online:
            raise DataError(f"{what} data: could not load {describe(src)} from the Hugging Face Hub "
                            f"({type(e).__name__}: {e}); check data.{what}.hub_id/split/data_dir, or "
                            f"{local_hint}") from e
        raise DataError(f"{what} data: the Hugging Face Hub cannot be reached and {describe(src)} is not in "
                        f"the local datasets cache; {local_hint}") from e


# --------------------------------------------------------------------------------------------- preflight


def sources_in_use(cfg) -> list[str]:
    """The `data.<what>` keys this run reads: SFT and the pairs always; HH-RLHF for D' (heldout) and for the
    win rate with eval.prompts=hh_helpful; AlpacaEval's instructions for the win rate otherwise."""
    if cfg.data.name != "paper":
        return []
    analysis = cfg.get("analysis")
    heldout = analysis is None or (analysis.enabled and analysis.dprime == "heldout")
    hh_prompts = cfg.get("eval") is not None and cfg.eval.get("prompts", "alpaca_eval") == "hh_helpful"
    return ["sft", "preferences", *(["questions"] if heldout or hh_prompts else []),
            *([] if hh_prompts else ["instructions"])]


def preflight_sources(cfg) -> None:
    """Open every data source the run will use (its schema or first row), in seconds; fail naming key and file."""
    for what in sources_in_use(cfg):
        peek_source(cfg.data[what], what, getattr(cfg.data.on_invalid, "value", cfg.data.on_invalid))


def peek_source(src: SourceConfig, what: str, on_invalid: str = "fail") -> None:
    """The source can be opened and its first row (or schema) has the columns `what` needs."""
    if src.path:
        builder, files = _data_files(Path(src.path).expanduser(), what)
        for f in files:
            _require_columns(_local_columns(Path(f), builder, what, on_invalid), what, f)
        return
    if not src.hub_id:
        raise DataError(f"{what} data: set data.{what}.path (a local file) or data.{what}.hub_id")
    if src.hub_id in SCRIPT_DATASETS:
        raise script_dataset_error(src.hub_id, what)
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _hub_offline():
            builder = datasets.load_dataset_builder(src.hub_id, data_dir=src.data_dir)
    except Exception as e:
        if "scripts are no longer supported" in str(e):
            raise script_dataset_error(src.hub_id, what) from e
        where = "could not be opened on the Hugging Face Hub" if online else (
            "is not in the local datasets cache and the Hugging Face Hub cannot be reached")
        raise DataError(f"{what} data: {describe(src)} {where} ({type(e).__name__}: {e}); {_hub_hint(what)}") from e
    splits = builder.info.splits
    if splits and src.split not in splits:
        raise DataError(f"{what} data: {src.hub_id} has no split {src.split!r} (it has {', '.join(splits)}); "
                        f"set data.{what}.split")
    if builder.info.features:
        _require_columns(list(builder.info.features), what, describe(src))


def _require_columns(found: list[str], what: str, where) -> None:
    missing = [c for c in COLUMNS[what] if c not in found]
    if missing:
        raise DataError(f"{what} data {where}: no column(s) {', '.join(missing)} (found: {', '.join(found)}); "
                        f"data.{what}.path must hold the schema of DESIGN 2")


def _first_json_line(head: str, on_invalid: str):
    lines = head.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            if on_invalid != "skip" or number == len(lines):
                raise ValueError(f"line {number} is not JSON ({e.msg} at column {e.colno})") from e
    raise ValueError("the file is empty")


def _local_columns(path: Path, builder: str, what: str, on_invalid: str = "fail") -> list[str]:
    """Column names from a parquet schema, or from the first row of a JSON lines file / JSON list (with
    `on_invalid=skip`, the first line that is JSON)."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            head = f.read(_PEEK_BYTES)
        text = head.lstrip()
        if not text:
            raise ValueError("the file is empty")
        if text[0] == "[":  # a top-level JSON list (AlpacaEval's file)
            body = text[1:].lstrip()
            if body.startswith("]"):
                raise ValueError("an empty JSON list")
            first, _ = json.JSONDecoder().raw_decode(body)
        else:
            first = _first_json_line(head, on_invalid)
        if not isinstance(first, dict):
            raise ValueError(f"the first row is a {type(first).__name__}, not an object")
        return list(first)
    except Exception as e:
        raise DataError(f"{what} data: could not read {path} ({type(e).__name__}: {e}); data.{what}.path must be "
                        f"{_KINDS}") from e
