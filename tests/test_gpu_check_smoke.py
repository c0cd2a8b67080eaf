"""scripts/gpu_check.sh (the first check on a GPU) runs end to end in its CPU smoke mode and writes one JSON with
every part's figures, so the script a GPU user runs first has run here."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_quick_mode_writes_every_part(tmp_path):
    env = {**os.environ, "QUICK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result) == {"dpo_step", "memory", "alignment", "generation"}
    assert not any("error" in part for part in result.values() if isinstance(part, dict))
    (memory,) = result["memory"]
    assert memory["measured_gb"] > 0 and memory["plan_gb"] > 0
    assert result["generation"]["hf"]["tokens_per_s"] > 0
