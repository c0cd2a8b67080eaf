"""Stage cache: a stage's output lives under `<cache>/<stage>/<hash of what determines it>/`.

One SFT model per model/data/seed serves every PO run of a sweep. A build writes into `<hash>.partial/`, renamed
into place when complete, under a file lock (`<hash>.lock`), so concurrent jobs of a sweep build once and a killed
build leaves nothing that looks finished. The build folder's name depends on the key alone: a `resumable` build
(SFT, reward model: they checkpoint inside it) started again after a kill or a SLURM requeue continues from what
the killed one left; any other build starts it afresh. Leftovers of killed builds are removed by the next build of
the stage (`.tmp-<pid>` folders of older versions; `.partial` folders of non-resumable builds) once their lock
shows that no process is building them. In a multi-process job, rank 0 holds the lock; a `collective` build (a
training stage) runs on every rank into the same folder, any other build runs on rank 0 while the others wait.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from . import distributed

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when a stage's code changes what it produces
PARTIAL = "partial"  # `<hash>.partial/`: the folder a build writes into
# A build folder: `<hash>.partial`, or `<hash>.tmp-<pid>` of versions that named it after the building process.
BUILD_DIR = re.compile(r"^(?P<hash>[0-9a-f]{16})\.(?P<kind>partial|tmp-\d+)$")


def to_plain(obj):
    return OmegaConf.to_container(obj, resolve=True) if isinstance(obj, DictConfig) else obj


def config_hash(key: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **{k: to_plain(v) for k, v in key.items()}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_dir(target: Path) -> Path:
    return target.with_name(f"{target.name}.{PARTIAL}")


def _lock(target: Path) -> FileLock:
    return FileLock(str(target) + ".lock")


def cached(cache_root: str | Path, stage: str, key: dict, build: Callable[[Path], None],
           collective: bool = False, resumable: bool = False) -> Path:
    """Return the folder for (stage, key), building it with `build(folder)` if it is not there yet.

    `collective`: every process of the job takes part in `build` (e.g. a DeepSpeed training stage).
    `resumable`: `build` continues from what a killed build left in the folder (its checkpoints)."""
    target = Path(cache_root) / stage / config_hash(key)
    if (target / "DONE").exists():
        log.info("%s: reusing %s", stage, target)
        return target
    if distributed.world() == 1:
        return _locked_build(target, stage, key, build, resumable)
    if not collective:
        return Path(distributed.main_first(lambda: _locked_build(target, stage, key, build, resumable)))
    lock = _lock(target)
    if distributed.is_main():
        target.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # other jobs of the sweep building the same folder: wait for them, then reuse theirs
    needed = distributed.broadcast(not (target / "DONE").exists())
    try:
        if needed:
            _build(target, stage, key, build, resumable, collective=True)
        distributed.barrier()
    finally:
        if distributed.is_main():
            lock.release()
    return target


def _locked_build(target: Path, stage: str, key: dict, build: Callable[[Path], None], resumable: bool) -> Path:
    """Build in this process alone, under the lock that other jobs of a sweep take too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        _build(target, stage, key, build, resumable)
    return target


def _build(target: Path, stage: str, key: dict, build: Callable[[Path], None], resumable: bool,
           collective: bool = False) -> None:
    """Build into `<target>.partial` and rename it into place; `collective`: every rank builds, rank 0 renames.
    The caller holds the key's lock."""
    main = not collective or distributed.is_main()
    sync = distributed.barrier if collective else (lambda: None)
    if (target / "DONE").exists():  # another job built it while we waited
        return
    folder = build_dir(target)
    if main:
        remove_leftovers(target, resumable)
        if folder.exists() and resumable:
            log.info("%s: continuing the build a killed job left in %s", stage, folder)
        elif folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(exist_ok=True)
    sync()
    log.info("%s: building %s", stage, target)
    try:
        build(folder)
    except BaseException:
        if main and not resumable:  # nothing in it is worth keeping
            shutil.rmtree(folder, ignore_errors=True)
        raise
    sync()
    if not main:
        return
    (folder / "key.json").write_text(json.dumps({k: to_plain(v) for k, v in key.items()}, indent=2, default=str))
    (folder / "DONE").touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(folder, target)


def remove_leftovers(target: Path, resumable: bool) -> list[Path]:
    """Remove the build folders of `target`'s stage that killed builds left behind; returns them.

    Ours (`target`'s key, whose lock the caller holds) and any other whose lock is free are dead: `.tmp-<pid>`
    folders (older versions) always go; `.partial` ones only for a stage whose builds cannot resume (a resumable
    one is kept for the job that will resume it, e.g. a requeued one). A lock that is held means a live builder,
    on this node or another sharing the cache, which a process id could not tell."""
    removed = []
    for folder in sorted(target.parent.iterdir()):
        match = BUILD_DIR.match(folder.name)
        if not match or not folder.is_dir():
            continue
        if match["kind"] == PARTIAL and (resumable or folder == build_dir(target)):  # to resume / rebuilt by the caller
            continue
        if match["hash"] == target.name:
            shutil.rmtree(folder, ignore_errors=True)
        elif not _remove_if_unlocked(folder, target.with_name(match["hash"])):
            continue
        log.warning("removed %s, left by a killed build", folder)
        removed.append(folder)
    return removed


def _remove_if_unlocked(folder: Path, owner: Path) -> bool:
    """Remove `folder` if no process holds `owner`'s lock (holding it meanwhile, so no build can start in it)."""
    lock = _lock(owner)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        lock.release()
    return True
