"""One atomic writer for every file a reader may see mid-run (summary, win rates, loss checks, run length):
write beside the target, then rename over it, so a killed run leaves the old file or the new one, never half."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a sibling file, then rename it onto `path` (os.replace is atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj, indent: int = 1, **dumps) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent, **dumps)))


def write_csv(path: Path, frame, **to_csv) -> Path:
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, **to_csv))


def replace_dir(written: Path, target: Path) -> Path:
    """Put a fully written folder in place of `target` (removing an older one: a re-save after a resume at the
    same step is as good). Readers see the old folder or the new one; a kill between the two leaves neither,
    and the writer's next run writes it again."""
    import shutil

    if Path(target).exists():
        shutil.rmtree(target)
    os.replace(written, target)
    return Path(target)
