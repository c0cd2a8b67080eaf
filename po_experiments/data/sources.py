"""Load one data set from a local file/folder or the Hugging Face Hub, failing fast and clearly when it can't.

`SourceConfig.path` (a .json/.jsonl/.jsonl.gz/.json.gz/.parquet file, or a folder of them) wins over
`hub_id`, so users with a mirror or an air-gapped cluster point at their copy with
`data.<what>.path=/path/to/file.jsonl`. Without a path the hub is used; when it cannot be reached only the
local HF datasets cache is tried, in offline mode, so a missing data set fails in seconds instead of
retrying the network for minutes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import datasets

from ..config import SourceConfig
from ..errors import DataError
from ..hub import hub_reachable

# Longest suffixes first so "x.jsonl.gz" is not taken for a ".gz" of unknown kind.
_BUILDERS = {
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
_KINDS = "a .json, .jsonl, .jsonl.gz, .json.gz or .parquet file, or a folder of them"


def describe(src: SourceConfig) -> str:
    """A short name for messages: the local path, or the hub id with its split and data_dir."""
    if src.path:
        return str(src.path)
    where = f"split {src.split}" + (f", data_dir {src.data_dir}" if src.data_dir else "")
    return f"{src.hub_id} ({where})"


def load_source(src: SourceConfig, what: str) -> datasets.Dataset:
    """The rows of one source as a `datasets.Dataset`, truncated to `max_rows`.

    `what` is the key under `data.` (sft, preferences, questions, instructions); errors name
    `data.<what>.path` so the user knows which setting to change. Local files are one split: `split`
    and `data_dir` only apply to the hub.
    """
    if src.max_rows is not None and src.max_rows <= 0:
        raise DataError(f"data.{what}.max_rows must be > 0 (or null for all rows), got {src.max_rows}")
    ds = _load_local(Path(src.path).expanduser(), what) if src.path else _load_hub(src, what)
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


def _load_local(path: Path, what: str) -> datasets.Dataset:
    builder, files = _data_files(path, what)
    try:
        # The json builder also reads a top-level JSON list (AlpacaEval's file) and gzip-compressed files.
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # a parse error deep in pyarrow: say which file, keep the cause
        raise DataError(f"{what} data: could not read {path} ({type(e).__name__}: {e})") from e


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


def _load_hub(src: SourceConfig, what: str) -> datasets.Dataset:
    if not src.hub_id:
        raise DataError(f"{what} data: set data.{what}.path (a local file) or data.{what}.hub_id")
    local_hint = (f"point at a local copy with data.{what}.path=/path/to/file.jsonl "
                  f"({_KINDS}, in the hub's schema)")
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _hub_offline():
            return datasets.load_dataset(src.hub_id, data_dir=src.data_dir, split=src.split)
    except Exception as e:
        if online:
            raise DataError(f"{what} data: could not load {describe(src)} from the Hugging Face Hub "
                            f"({type(e).__name__}: {e}); check data.{what}.hub_id/split/data_dir, or "
                            f"{local_hint}") from e
        raise DataError(f"{what} data: the Hugging Face Hub cannot be reached and {describe(src)} is not in "
                        f"the local datasets cache; {local_hint}") from e
