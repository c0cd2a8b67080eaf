"""Preemption-safe cache builds: SFT and the learned reward model checkpoint inside their build folder, resume after
SIGKILL to the weights of an uninterrupted build (bitwise, CPU, one thread), and leave no build folder behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from conftest import REPO
from po_experiments import cache
from po_experiments.cache import build_dir, cached, config_hash
from po_experiments.checkpoints import StepCheckpoints, WallClockSaves, resume_point

# SFT: 24 steps of 64, a checkpoint every 8; the learned RM: ~9 steps of 16 pairs, a checkpoint every step by wall
# time alone (runtime.checkpoint_every_min tiny, reward.train.save_steps=0).
FAST = ["runtime.threads=1", "data.n_sft=1600", "model.sft.max_steps=24", "model.sft.save_steps=8",
        "model.sft.logging_steps=4", "reward=learned", "data.n_pref_prompts=160", "reward.train.batch_size=16",
        "reward.train.epochs=1"]

# One stage of the pipeline in a process of its own, as run.py would run it (compose, validate, threads, seed).
STAGE = r"""
import sys
from hydra import compose, initialize_config_dir
import po_experiments.config
from po_experiments import distributed
from po_experiments.config import validate
from po_experiments.models import set_threads
from po_experiments.stages.sft import sft_model_dir
from transformers import set_seed
with initialize_config_dir(version_base="1.3", config_dir=sys.argv[1]):
    cfg = compose("config", overrides=sys.argv[3:])
validate(cfg)
distributed.setup(cfg)
set_threads(cfg.runtime.threads, cfg.runtime.deterministic)
set_seed(cfg.seed)
folder = sft_model_dir(cfg)
if sys.argv[2] == "reward":
    from po_experiments.rewards import reward_model_dir
    folder = reward_model_dir(cfg, folder)
if distributed.is_main():  # one line: two ranks printing at once can interleave on one line
    print(folder)
"""


def run_stage(stage: str, cache_dir: Path, *overrides: str, check: bool = True,
              processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    script = cache_dir.parent / "stage.py"
    script.write_text(STAGE)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", _port()]
    args = [*launcher, str(script), str(REPO / "conf"), stage, *FAST, f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={cache_dir.parent / 'run'}", *overrides]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def built(proc: subprocess.CompletedProcess) -> Path:
    return Path(proc.stdout.strip().splitlines()[-1])


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def build_folders(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in stage_dir.iterdir() if ".partial" in p.name or ".tmp-" in p.name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference SFT build, never killed."""
    cache_dir = tmp_path_factory.mktemp("uninterrupted") / "cache"
    return SimpleNamespace(cache=cache_dir, sft=built(run_stage("sft", cache_dir)))


# ------------------------------------------------------------------------------------- kill and resume (slow)


@pytest.mark.slow
def test_killed_sft_resumes_to_the_weights_of_an_uninterrupted_build(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    killed = run_stage("sft", cache_dir, "debug.kill_at_sft_step=13", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    target = cache_dir / "sft" / uninterrupted.sft.name
    partial = build_dir(target)
    assert build_folders(target.parent) == [partial.name] and not target.exists()
    assert sorted(p.name for p in (partial / "checkpoints").glob("step-*")) == ["step-8"]  # the newest only
    # Leftovers of killed builds of older versions, named after their dead process: one of this key, one of another.
    stale = [target.with_name(f"{target.name}.tmp-4194000"), target.with_name("0123456789abcdef.tmp-4194001")]
    for folder in stale:
        (folder / "trainer").mkdir(parents=True)

    resumed = built(run_stage("sft", cache_dir))  # a requeued job: the same config in another process
    assert resumed == target and (target / "DONE").exists()
    metrics = json.loads((target / "sft_metrics.json").read_text())
    assert metrics["resumed_from_step"] == 8 and metrics["steps_in_this_job"] == 16 and metrics["steps"] == 24
    reference = json.loads((uninterrupted.sft / "sft_metrics.json").read_text())
    assert reference["resumed_from_step"] == 0 and reference["steps_in_this_job"] == 24
    assert max_abs_diff(target, uninterrupted.sft) == 0.0
    assert build_folders(target.parent) == [] and not (target / "checkpoints").exists()


@pytest.mark.slow
def test_killed_two_process_sft_resumes_in_the_same_folder(uninterrupted, tmp_path):
    """A collective build: rank 0 holds the lock, both ranks train into one folder and resume from it."""
    cache_dir = tmp_path / "cache"
    killed = run_stage("sft", cache_dir, "debug.kill_at_sft_step=13", check=False, processes=2)
    assert killed.returncode != 0
    partial = build_dir(cache_dir / "sft" / uninterrupted.sft.name)
    assert sorted(p.name for p in (partial / "checkpoints").glob("step-*")) == ["step-8"]

    resumed = built(run_stage("sft", cache_dir, processes=2))
    metrics = json.loads((resumed / "sft_metrics.json").read_text())
    assert metrics["resumed_from_step"] == 8 and metrics["steps_in_this_job"] == 16
    assert build_folders(resumed.parent) == []
    # The same global batches, summed across 2 ranks in another order: float32 rounding apart (5.5e-6 measured;
    # a resume that lost state is ~1e-2 apart).
    assert max_abs_diff(resumed, uninterrupted.sft) < 5e-5


@pytest.mark.slow
def test_killed_reward_model_resumes_from_a_wall_clock_checkpoint(uninterrupted, tmp_path):
    every_step = "runtime.checkpoint_every_min=1e-9"  # wall-time saves only (reward.train.save_steps=0)
    reference = built(run_stage("reward", uninterrupted.cache, every_step))
    cache_dir = tmp_path / "cache"
    shutil.copytree(uninterrupted.cache, cache_dir, ignore=shutil.ignore_patterns("reward"))  # SFT and pairs

    killed = run_stage("reward", cache_dir, every_step, "debug.kill_at_reward_step=6", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = build_dir(cache_dir / "reward" / reference.name)
    assert sorted(p.name for p in (partial / "checkpoints").glob("step-*")) == ["step-5"]

    resumed = built(run_stage("reward", cache_dir, every_step))
    metrics = json.loads((resumed / "reward_metrics.json").read_text())
    assert metrics["resumed_from_step"] == 5 and metrics["steps_in_this_job"] == metrics["steps"] - 5
    assert max_abs_diff(resumed, reference) == 0.0
    assert build_folders(resumed.parent) == []


# ------------------------------------------------------------------------------------- the cache build folder


def test_a_resumable_build_continues_in_the_folder_a_killed_build_left(tmp_path):
    key = {"stage": "x"}
    partial = build_dir(tmp_path / "sft" / config_hash(key))
    (partial / "checkpoints").mkdir(parents=True)  # what a killed build left
    seen = []
    out = cached(tmp_path, "sft", key, lambda folder: seen.append(sorted(os.listdir(folder))), resumable=True)
    assert seen == [["checkpoints"]] and (out / "DONE").exists() and not partial.exists()


def test_a_build_that_cannot_resume_starts_afresh_and_removes_its_folder_when_it_fails(tmp_path):
    key = {"stage": "x"}
    partial = build_dir(tmp_path / "pairs" / config_hash(key))
    (partial / "half-written").mkdir(parents=True)
    seen = []
    cached(tmp_path, "pairs", key, lambda folder: seen.append(os.listdir(folder)))
    assert seen == [[]]

    def fail(folder):
        (folder / "half-written").touch()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached(tmp_path, "pairs", {"stage": "y"}, fail)
    assert build_folders(tmp_path / "pairs") == []


def test_leftovers_of_dead_builds_go_and_those_of_live_builds_stay(tmp_path):
    from filelock import FileLock

    stage = tmp_path / "sft"
    live, dead = "a" * 16, "b" * 16
    for name in (f"{live}.tmp-1", f"{dead}.tmp-2", f"{live}.partial", f"{dead}.partial", "notes.tmp-3"):
        (stage / name).mkdir(parents=True)
    with FileLock(str(stage / live) + ".lock"):  # another process (or node) is building `live`
        removed = cache.remove_leftovers(stage / ("c" * 16), resumable=True)
        assert [p.name for p in removed] == [f"{dead}.tmp-2"]
        assert build_folders(stage) == [f"{live}.partial", f"{live}.tmp-1", f"{dead}.partial", "notes.tmp-3"]
        removed = cache.remove_leftovers(stage / ("c" * 16), resumable=False)  # pairs: a partial is dead too
        assert [p.name for p in removed] == [f"{dead}.partial"]
    assert (stage / "notes.tmp-3").exists()  # not a build folder


def test_checkpoint_frequency_is_not_part_of_the_sft_key():
    from omegaconf import OmegaConf

    from po_experiments.stages.sft import sft_key

    cfg = OmegaConf.create({"model": {"name": "tiny", "sft": {"learning_rate": 1e-3, "save_steps": 100}, "dpo": {}},
                            "data": {"n_sft": 10}, "sft": {"seed": 0}})
    other = OmegaConf.merge(cfg, {"model": {"sft": {"save_steps": 7}}})
    changed = OmegaConf.merge(cfg, {"model": {"sft": {"learning_rate": 2e-3}}})
    assert config_hash(sft_key(cfg)) == config_hash(sft_key(other)) != config_hash(sft_key(changed))


# ------------------------------------------------------------------------------------- checkpoints


def test_wall_clock_saves_after_the_interval_and_not_at_the_end():
    now = [0.0]
    saves = WallClockSaves(minutes=2, clock=lambda: now[0])
    args, state = None, TrainerState()

    def step(at: float, last: bool = False) -> bool:
        now[0] = at
        control = TrainerControl(should_training_stop=last)
        saves.on_step_end(args, state, control)
        if control.should_save:
            saves.on_save(args, state, control)
        return control.should_save

    saves.on_train_begin(args, state, TrainerControl())
    assert [step(t) for t in (30, 119, 120, 150, 239, 241)] == [False, False, True, False, False, True]
    assert step(500, last=True) is False  # the final model is saved by the stage itself


def test_only_the_newest_checkpoint_is_kept_and_half_written_ones_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    callback = StepCheckpoints(root, keep_last=1)
    state = TrainerState()
    for step in (4, 8):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        state.global_step = step
        callback.on_save(None, state, TrainerControl())
    (root / "checkpoint-12").mkdir()  # killed while saving step 12
    signature = {"processes": 1, "deepspeed": "none"}
    assert resume_point(root, signature) == root / "step-8"
    assert sorted(p.name for p in root.iterdir()) == ["signature.json", "step-8"]


def test_checkpoints_of_a_job_of_another_shape_are_discarded(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-8").mkdir(parents=True)
    (root / "step-8" / "record.json").write_text(json.dumps({"step": 8}))
    assert resume_point(root, {"processes": 2, "deepspeed": "zero3"}) == root / "step-8"  # first job: its own
    assert resume_point(root, {"processes": 2, "deepspeed": "zero3"}) == root / "step-8"
    assert resume_point(root, {"processes": 1, "deepspeed": "none"}) is None  # ZeRO-3 shards of 2 ranks: unusable


# ------------------------------------------------------------------------------------- reproducibility


def test_auto_threads_do_not_follow_the_load_when_deterministic(monkeypatch):
    from po_experiments import models

    monkeypatch.setattr(models.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(models, "all_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        assert models.set_threads(0) == 3  # free cores: depends on what else runs
        assert models.set_threads(0, deterministic=True) == 4
        assert models.set_threads(2, deterministic=True) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("override,key", [
    ("runtime.checkpoint_every_min=-1", "runtime.checkpoint_every_min"),
    ("reward.train.save_steps=-2", "reward.train.save_steps"),
    ("debug.kill_at_sft_step=0", "debug.kill_at_sft_step"),
    ("debug.kill_at_reward_step=-1", "debug.kill_at_reward_step"),
])
def test_bad_checkpointing_settings_name_the_key(override, key):
    from po_experiments.config import validate
    from po_experiments.errors import ConfigError
    from test_config import make

    with pytest.raises(ConfigError, match=key):
        validate(make([override]))
