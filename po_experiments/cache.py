"""Stage cache: a stage's output lives under `<cache>/<stage>/<hash of what determines it>/`.

One SFT model per model/data/seed serves every PO run of a sweep. Builds happen in a temporary folder renamed
into place when complete, under a file lock, so concurrent jobs of a sweep build once and a killed build leaves
nothing that looks finished. In a multi-process job, rank 0 holds the lock; a `collective` build (a training
stage) runs on every rank into the same folder, any other build runs on rank 0 while the others wait.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from . import distributed

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when a stage's code changes what it produces


def to_plain(obj):
    return OmegaConf.to_container(obj, resolve=True) if isinstance(obj, DictConfig) else obj


def config_hash(key: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **{k: to_plain(v) for k, v in key.items()}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(cache_root: str | Path, stage: str, key: dict, build: Callable[[Path], None],
           collective: bool = False) -> Path:
    """Return the folder for (stage, key), building it with `build(tmp_dir)` if it is not there yet.

    `collective`: every process of the job takes part in `build` (e.g. a DeepSpeed training stage)."""
    target = Path(cache_root) / stage / config_hash(key)
    if (target / "DONE").exists():
        log.info("%s: reusing %s", stage, target)
        return target
    if distributed.world() == 1:
        return _locked_build(target, stage, key, build)
    if not collective:
        return Path(distributed.main_first(lambda: _locked_build(target, stage, key, build)))
    lock = FileLock(str(target) + ".lock")
    if distributed.is_main():
        target.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # other jobs of the sweep building the same folder: wait for them, then reuse theirs
    tmp = distributed.broadcast(None if (target / "DONE").exists() else f"tmp-{os.getpid()}")
    try:
        if tmp is not None:
            _build(target, stage, key, build, tmp, collective=True)
        distributed.barrier()
    finally:
        if distributed.is_main():
            lock.release()
    return target


def _locked_build(target: Path, stage: str, key: dict, build: Callable[[Path], None]) -> Path:
    """Build in this process alone, under the lock that other jobs of a sweep take too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        _build(target, stage, key, build, f"tmp-{os.getpid()}")
    return target


def _build(target: Path, stage: str, key: dict, build: Callable[[Path], None], tmp_name: str,
           collective: bool = False) -> None:
    """Build into `<target>.<tmp_name>` and rename it into place; `collective`: every rank builds, rank 0 renames."""
    main = not collective or distributed.is_main()
    sync = distributed.barrier if collective else (lambda: None)
    if (target / "DONE").exists():  # another job built it while we waited
        return
    tmp = target.with_name(f"{target.name}.{tmp_name}")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    sync()
    log.info("%s: building %s", stage, target)
    build(tmp)
    sync()
    if not main:
        return
    (tmp / "key.json").write_text(json.dumps({k: to_plain(v) for k, v in key.items()}, indent=2, default=str))
    (tmp / "DONE").touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
