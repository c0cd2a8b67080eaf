"""Stage cache: a stage's output lives under `<cache>/<stage>/<hash of what determines it>/`.

One SFT model per model/data/seed serves every PO run of a sweep. Builds happen in a temporary folder renamed
into place when complete, under a file lock, so concurrent jobs of a sweep build once and a killed build leaves
nothing that looks finished.
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

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when a stage's code changes what it produces


def to_plain(obj):
    return OmegaConf.to_container(obj, resolve=True) if isinstance(obj, DictConfig) else obj


def config_hash(key: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **{k: to_plain(v) for k, v in key.items()}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(cache_root: str | Path, stage: str, key: dict, build: Callable[[Path], None]) -> Path:
    """Return the folder for (stage, key), building it with `build(tmp_dir)` if it is not there yet."""
    target = Path(cache_root) / stage / config_hash(key)
    if (target / "DONE").exists():
        log.info("%s: reusing %s", stage, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "DONE").exists():  # another job built it while we waited
            return target
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log.info("%s: building %s", stage, target)
        build(tmp)
        (tmp / "key.json").write_text(json.dumps({k: to_plain(v) for k, v in key.items()}, indent=2, default=str))
        (tmp / "DONE").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target
