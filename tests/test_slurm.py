"""Sweeps through Hydra's launchers: real SLURM jobs, re-runs that train nothing, a killed job that ends the sweep.

The SLURM tests submit to the cluster `scripts/local_slurm.sh up` starts on localhost (CI brings it up) and are
skipped only when no SLURM controller answers (`sinfo` fails). The job ids and their states from `sacct` are
printed in pytest's summary at the end of the session. The last two tests need no SLURM.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = "sweep"
# Small but real: SFT 40 steps, ~280 pairs, DPO 6 steps of 16 pairs, checkpoints (and win rates) at 2, 4, 6.
FAST = ["data.n_sft=2000", "model.sft.max_steps=40", "data.n_pref_prompts=300", "data.n_heldout=60",
        "model.dpo.batch_size=16", "model.dpo.max_steps=6", "model.dpo.save_steps=2", "model.dpo.logging_steps=1",
        "model.cdpo.t1=2", "model.cdpo.t2=5",  # cDPO's (t1, t2) inside the 6 steps (checked at validation)
        "analysis.n_pairs=40", "analysis.n_dprime=24", "runtime.threads=1", "logger=none"]
KILL_BOUND_S = 120   # a sweep with a job that SIGKILLs itself must fail within this (it must never hang)

pytestmark = pytest.mark.slow


def slurm_answers() -> bool:
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_slurm = pytest.mark.skipif(not slurm_answers(), reason="no SLURM controller answers (sinfo failed); "
                                                             "start one with scripts/local_slurm.sh up")


def sweep_command(cache: Path, *overrides: str, launcher: str | None = "slurm_cpu", name: str = NAME):
    """The command line and environment; an override of a FAST key replaces it (Hydra refuses a key twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *([f"hydra/launcher={launcher}"] if launcher else []),
           f"name={name}", *overrides, *(o for o in FAST if o.split("=", 1)[0] not in keys)]
    return cmd, {**os.environ, "PO_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def sweep(workdir: Path, cache: Path, *overrides: str, launcher: str | None = "slurm_cpu",
          timeout: int = 600) -> subprocess.CompletedProcess:
    """`python run.py -m name=sweep <overrides> <FAST>` in workdir; .output = stdout + stderr, .elapsed in s."""
    cmd, env = sweep_command(cache, *overrides, launcher=launcher)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    proc.elapsed = time.monotonic() - started
    proc.output = proc.stdout + proc.stderr
    print(f"$ {' '.join(cmd[1:])}\n  exit {proc.returncode} after {proc.elapsed:.0f}s")
    return proc


def submitted(proc) -> list[str]:
    """The SLURM job ids the launcher logged ('submitted 4 job(s): 12_0 12_1 ...')."""
    found = re.findall(r"submitted \d+ job\(s\): ([0-9_ ]+)", proc.output)
    assert found, proc.output[-3000:]
    return found[-1].split()


def sacct_states(ids: list[str], final: bool = True) -> dict[str, str]:
    """{job id: state} from sacct; waits (up to 60 s) until each job's record shows a final state."""
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", *(a for i in ids for a in ("-j", i))],
                             capture_output=True, text=True, timeout=30).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        states = {i: states.get(i, "MISSING").split()[0] for i in ids}
        busy = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "MISSING"}
        if not final or not busy & set(states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(2)


def summaries(workdir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((workdir / "outputs" / NAME / "multirun").glob("*/summary.json"))}


def snapshot(workdir: Path) -> dict[str, tuple]:
    """Every summary, checkpoint and final-model file of the sweep with its size and mtime (ns)."""
    root = workdir / "outputs" / NAME / "multirun"
    files = [*root.glob("*/summary.json"), *root.glob("*/checkpoints/**/*"), *root.glob("*/model/**/*")]
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()}


def job_log(workdir: Path, job_id: str, name: str = NAME) -> str:
    """A job's stdout (where Hydra's job logging goes), from submitit's folder."""
    path = workdir / "outputs" / name / "multirun" / ".submitit" / job_id / f"{job_id}_0_log.out"
    return path.read_text(errors="replace") if path.exists() else ""


# ------------------------------------------------------------------------------------------- real SLURM jobs

@pytest.fixture(scope="module")
def slurm_jobs(request):
    """Collects the job ids the tests submit; their sacct table is printed in pytest's terminal summary."""
    ids: list[str] = []

    class SacctTable:
        def pytest_terminal_summary(self, terminalreporter):
            arrays = sorted({i.split("_")[0] for i in ids}, key=int)
            out = subprocess.run(["sacct", "-X", "-j", ",".join(arrays), "-o",
                                  "JobID,JobName%8,State,ExitCode,Elapsed,NodeList,WorkDir%60"],
                                 capture_output=True, text=True, timeout=30)
            terminalreporter.section("SLURM jobs of tests/test_slurm.py (sacct)")
            terminalreporter.write(out.stdout + out.stderr)

    if not any(p.__class__.__name__ == "SacctTable" for p in request.config.pluginmanager.get_plugins()):
        request.config.pluginmanager.register(SacctTable(), "test_slurm_sacct_table")
    return ids


@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory, slurm_jobs):
    """The four-job sweep, run once through SLURM: (workdir, cache, the sweep's process)."""
    workdir, cache = tmp_path_factory.mktemp("slurm_sweep"), tmp_path_factory.mktemp("slurm_cache")
    proc = sweep(workdir, cache, "algo=dpo,cdpo", "seed=0,1")
    assert proc.returncode == 0, proc.output[-4000:]
    slurm_jobs.extend(submitted(proc))
    return workdir, cache, proc


@needs_slurm
def test_sweep_runs_as_slurm_jobs(slurm_sweep):
    workdir, _, proc = slurm_sweep
    ids = submitted(proc)
    states = sacct_states(ids)
    print("sacct:", states)
    assert len(ids) == 4 and set(states.values()) == {"COMPLETED"}, states
    done = summaries(workdir)
    assert sorted((s["algo"], s["seed"]) for s in done.values()) == [("cdpo", 0), ("cdpo", 1), ("dpo", 0), ("dpo", 1)]
    for run, summary in done.items():
        assert isinstance(summary["win_rate"], float) and 0 <= summary["win_rate"] <= 100, (run, summary)
        assert summary["final_step"] == 6 and summary["resumed_from"] is None
        run_dir = workdir / "outputs" / NAME / "multirun" / run
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-2", "step-4", "step-6"]


@needs_slurm
def test_rerunning_the_sweep_trains_nothing(slurm_sweep, slurm_jobs):
    workdir, cache, _ = slurm_sweep
    before = snapshot(workdir)
    proc = sweep(workdir, cache, "algo=dpo,cdpo", "seed=0,1")
    assert proc.returncode == 0, proc.output[-4000:]
    ids = submitted(proc)
    slurm_jobs.extend(ids)
    assert set(sacct_states(ids).values()) == {"COMPLETED"}
    assert snapshot(workdir) == before  # the same summaries, checkpoints and models, untouched
    for job_id in ids:
        log = job_log(workdir, job_id)
        assert "run already finished" in log and "win rate at step" not in log, (job_id, log[-2000:])


@needs_slurm
def test_a_killed_job_fails_the_sweep_quickly_and_resumes(slurm_sweep, slurm_jobs):
    workdir, cache, _ = slurm_sweep
    # seeds 0 and 1 are finished (skipped at once); seed 2 is new and SIGKILLs itself after optimizer step 3
    proc = sweep(workdir, cache, "algo=dpo", "seed=0,1,2", "debug.kill_at_step=3", timeout=KILL_BOUND_S + 120)
    ids = submitted(proc)
    slurm_jobs.extend(ids)
    print(proc.stderr[-3000:])
    assert proc.returncode != 0
    assert proc.elapsed < KILL_BOUND_S, f"the sweep took {proc.elapsed:.0f}s to report its killed job"
    killed = ids[2]
    states = sacct_states(ids)
    assert states == {ids[0]: "COMPLETED", ids[1]: "COMPLETED", killed: "FAILED"}, states
    # the error names the job, its sweep point, its state from sacct and its log; the log shows why
    error = proc.stderr
    assert "1 of 3 sweep job(s) failed" in error
    assert re.search(rf"job {killed} \(#2: seed=2\): FAILED", error), error
    log_file = workdir / "outputs" / NAME / "multirun" / ".submitit" / killed / f"{killed}_0_log.err"
    assert str(log_file) in error and log_file.exists()
    assert "debug.kill_at_step=3: killing this process with SIGKILL" in proc.stdout  # quoted from the job's log
    run_dir = next((workdir / "outputs" / NAME / "multirun").glob("*seed=2"))
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoints" / "step-2").exists()

    # the same command without the kill: finished jobs skip, the killed one resumes from its last checkpoint
    proc = sweep(workdir, cache, "algo=dpo", "seed=0,1,2")
    assert proc.returncode == 0, proc.output[-4000:]
    slurm_jobs.extend(submitted(proc))
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("step-2") and resumed["final_step"] == 6


@needs_slurm
def test_a_preempted_job_is_requeued_and_resumes(slurm_sweep, slurm_jobs):
    """USR2 (what submitit asks SLURM to send before a timeout, and what preemption sends) while the job trains:
    submitit calls the launcher's checkpoint and requeues the job; the sweep command waits through the requeue
    and the job's second start resumes from its last checkpoint."""
    workdir, cache, _ = slurm_sweep
    # a longer training (20 steps of 16 pairs between checkpoints), in a sweep of its own
    cmd, env = sweep_command(cache, "algo=dpo", "seed=0", "data.n_pref_prompts=2000", "model.dpo.max_steps=120",
                             "model.dpo.save_steps=20", name="preempt")
    root = workdir / "outputs" / "preempt" / "multirun"
    with subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        deadline = time.monotonic() + 300
        while not list(root.glob("*/checkpoints/step-20")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        job_id = next(p.name for p in (root / ".submitit").iterdir() if p.name.isdigit())
        slurm_jobs.append(job_id)
        assert not list(root.glob("*/summary.json")), "the run finished before it could be signalled"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        output, _ = proc.communicate(timeout=600)  # SLURM holds a requeued job ~2 min before it starts again
    assert proc.returncode == 0, output[-4000:]
    assert sacct_states([job_id]) == {job_id: "COMPLETED"}  # (waits until the job's record is final)
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
                             capture_output=True, text=True).stdout  # -D: every start of the job
    print(history)
    assert "REQUEUED" in history and history.strip().endswith("COMPLETED"), history
    log = job_log(workdir, job_id, name="preempt")
    assert "Requeued job" in log, log[-3000:]
    summary = json.loads(next(root.glob("*/summary.json")).read_text())
    assert summary["resumed_from"] and summary["final_step"] == 120


# ------------------------------------------------------------------------------------------------- no SLURM

@pytest.fixture(scope="module")
def local_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("local_cache")


def test_rerunning_a_finished_sweep_trains_nothing_with_the_basic_launcher(tmp_path, local_cache):
    proc = sweep(tmp_path, local_cache, "algo=dpo,cdpo", launcher=None)  # Hydra's basic launcher, in-process
    assert proc.returncode == 0, proc.output[-4000:]
    assert len(summaries(tmp_path)) == 2
    before = snapshot(tmp_path)
    proc = sweep(tmp_path, local_cache, "algo=dpo,cdpo", launcher=None)
    assert proc.returncode == 0, proc.output[-4000:]
    assert proc.output.count("run already finished") == 2 and "win rate at step" not in proc.output
    assert snapshot(tmp_path) == before


def test_the_local_launcher_names_a_killed_job(tmp_path, local_cache):
    proc = sweep(tmp_path, local_cache, "algo=dpo", "debug.kill_at_step=3", launcher="local",
                 timeout=KILL_BOUND_S + 120)
    assert proc.returncode != 0 and proc.elapsed < KILL_BOUND_S, (proc.elapsed, proc.output[-4000:])
    job_id = submitted(proc)[0]
    assert "1 of 1 sweep job(s) failed" in proc.stderr and f"job {job_id} (#0: " in proc.stderr, proc.stderr
    assert f"{job_id}_0_log.err" in proc.stderr
    assert "debug.kill_at_step=3: killing this process with SIGKILL" in proc.stdout
