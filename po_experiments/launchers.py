"""Hydra's submitit launchers (conf/hydra/launcher/), with a sweep that ends clearly when a job fails.

Submission is hydra-submitit-launcher's (one SLURM job array per sweep, the launcher itself pickled as the
job's callable, so its `checkpoint` method requeues a preempted or timed-out job and the pipeline resumes
from its last checkpoint). What differs is the wait: the stock launcher waits on the jobs in order and, when
one died outright (SIGKILL, OOM killer, node failure: no result file), raises submitit's error carrying the
job's whole stderr. Here every job is watched at once; a failure is logged the moment `sacct` reports it,
and once all jobs have ended the sweep exits non-zero with one message naming, for each failed job, its
SLURM id, sweep point, run dir, state and exit code from `sacct`, its log files and the log's last lines.
A job whose Python code raised (the job itself COMPLETED, Hydra returned the error) is reported the same way.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _stock
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

POLL_S = 2.0           # how often result files are looked for (a file check, cheap)
STATE_REFRESH_S = 60   # at most this long between two `sacct` calls (submitit alone backs off to 10 min)
LOG_TAIL = 8           # lines of each of a failed job's logs (stdout: our log lines; stderr: tracebacks) quoted
_PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar
_INCOMPLETE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "PREEMPTED"}


class SweepJobsFailed(CompactHydraException):
    """Printed by Hydra as its message alone (no traceback); the sweep command exits with status 1."""


def _tail(path: Path, n: int) -> list[str]:
    """The last n meaningful lines of a log: progress bars (tqdm redraws) left out."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    parts = (part for line in text.splitlines() for part in line.split("\r"))
    lines = (re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", part).rstrip() for part in parts)
    return [line for line in lines if line.strip() and not _PROGRESS.search(line)][-n:]


def _sacct(job_id: str, tries: int = 10) -> str:
    """'FAILED, exit 0:9 (killed by signal 9), after 00:00:31 on localhost' from sacct; '' when sacct cannot say.
    Right after a job ends, sacct may still show its array record as pending: asked again for a few seconds."""
    for _ in range(tries):
        try:
            out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id,
                                  "-o", "JobID,State,ExitCode,Elapsed,NodeList"],
                                 capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
        for row in out.splitlines():
            fields = row.split("|")
            if len(fields) == 5 and fields[0] == job_id and (fields[1].split() or ["PENDING"])[0] not in _INCOMPLETE:
                _, state, exit_code, elapsed, nodes = fields
                sig = exit_code.partition(":")[2]
                why = f" (killed by signal {sig})" if sig not in ("", "0") else ""
                return f"{state}, exit {exit_code}{why}, after {elapsed} on {nodes or '-'}"
        time.sleep(1)
    return ""


def _point_labels(job_overrides: list[list[str]]) -> list[str]:
    """What tells the sweep's points apart (the overrides that vary), or every override for a single job."""
    points = [filter_overrides(o) for o in job_overrides]
    shared = set.intersection(*(set(p) for p in points)) if len(points) > 1 else set()
    return [" ".join(o for o in p if o not in shared) or " ".join(p) for p in points]


class _WatchingLauncher:
    """Mixin over hydra-submitit-launcher's launchers: same submission, a wait that reports failed jobs."""

    _EXECUTOR: str

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        params = dict(self.params)
        folder = params.pop("submitit_folder")
        executor_args: dict[str, Any] = {"folder": folder}
        if "max_num_timeout" in params:  # requeues on timeout: an executor argument, not a job parameter
            executor_args[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **executor_args)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)

        calls = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            calls.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*calls))
        log.info("submitted %d job(s): %s (submitit logs: %s)", len(jobs), " ".join(j.job_id for j in jobs),
                 Path(str(folder).replace("%j", "<job id>")))
        return self._wait(jobs, [list(o) for o in job_overrides], initial_job_idx)

    def _wait(self, jobs: list, job_overrides: list[list[str]], first_idx: int) -> list[JobReturn]:
        results: list[JobReturn | None] = [None] * len(jobs)
        labels = _point_labels(job_overrides)
        failures: list[tuple[str, str]] = []  # (one-line summary, details)
        pending = set(range(len(jobs)))
        submitted = last_refresh = time.time()
        while pending:
            # job states from sacct: every 5 s at first, backing off to STATE_REFRESH_S (one call for all jobs)
            interval = min(STATE_REFRESH_S, max(5.0, (time.time() - submitted) / 4))
            if self._EXECUTOR == "slurm" and time.time() - last_refresh > interval:  # local jobs have no sacct
                jobs[0].watcher.update()
                last_refresh = time.time()
            for i in sorted(pending):
                if not jobs[i].done():
                    continue
                pending.discard(i)
                name = f"job {jobs[i].job_id} (#{first_idx + i}: {labels[i]})"
                reason = self._outcome(jobs[i], results, i)
                if reason is None:
                    log.info("%s finished", name)
                    continue
                summary, details = self._describe(jobs[i], name, job_overrides[i], reason)
                log.error("%s\n%s", summary, details)  # now, not only when the whole sweep has ended
                failures.append((summary, details))
            if pending:
                time.sleep(POLL_S)
        if failures:
            raise SweepJobsFailed(
                f"{len(failures)} of {len(jobs)} sweep job(s) failed (their logs' last lines are above):\n"
                + "\n".join(f"  {summary}\n" + "\n".join(line for line in details.splitlines()
                                                        if line.lstrip().startswith(("why:", "run dir:", "log:")))
                            for summary, details in failures)
                + "\nRun the same command again: finished jobs are skipped, failed ones resume from their last "
                  "checkpoint.")
        return results  # type: ignore[return-value]

    def _outcome(self, job, results: list, slot: int) -> str | None:
        """Store the job's JobReturn; return why the job failed, or None."""
        import submitit

        try:
            ret = job.results()[0]  # task 0's; every task of a multi-process job must succeed
        except submitit.core.utils.UncompletedJobError:
            return "it ended without a result: killed (signal, out of memory, time limit, node failure) or exited early"
        except submitit.core.utils.FailedJobError:
            return "it raised an error (the traceback is in its log)"
        results[slot] = ret
        if ret.status == JobStatus.FAILED:
            err = ret._return_value
            return f"it raised {type(err).__name__}: {err}"
        return None

    def _describe(self, job, name: str, overrides: list[str], reason: str) -> tuple[str, str]:
        state = _sacct(job.job_id) if self._EXECUTOR == "slurm" else ""
        summary = f"{name}: {state or job.state}"
        lines = [f"    why:     {reason}"]
        run_dir = self._run_dir(overrides)
        if run_dir:
            lines.append(f"    run dir: {run_dir}")
        lines.append(f"    log:     {job.paths.stderr}")
        lines.append(f"             {job.paths.stdout}")
        for path in (job.paths.stdout, job.paths.stderr):
            tail = _tail(path, LOG_TAIL)
            if tail:
                lines.append(f"    last lines of {path.name}:")
                lines.extend(f"      | {line}" for line in tail)
        return summary, "\n".join(lines)

    def _run_dir(self, overrides: list[str]) -> str | None:
        """The job's run dir, composed here as the job composed it (hydra.sweep.dir / hydra.sweep.subdir)."""
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            return str(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))
        except Exception:  # only a nicety for the message
            return None


class SlurmLauncher(_WatchingLauncher, _stock.SlurmLauncher):
    """hydra/launcher=slurm | slurm_cpu: one SLURM job per sweep point (a job array)."""


class LocalLauncher(_WatchingLauncher, _stock.LocalLauncher):
    """hydra/launcher=local: submitit's local executor (subprocesses on this machine), same reporting."""


# Hydra instantiates launchers only from the `hydra_plugins` namespace (a plugin scan at start-up). Rather than
# ship a second top-level package, the launcher configs name these classes `hydra_plugins.po_experiments.*` and
# add the RegisterLaunchers callback, whose import (callbacks are instantiated before the sweeper and its
# launcher) maps those names to the classes here. The classes keep their real module, so a submitted job
# unpickles them from po_experiments.launchers.
PLUGIN_NAMES = {"hydra_plugins.po_experiments.SlurmLauncher": SlurmLauncher,
                "hydra_plugins.po_experiments.LocalLauncher": LocalLauncher}


def register_launchers() -> None:
    plugins = Plugins.instance()
    for name, cls in PLUGIN_NAMES.items():
        plugins.register(cls)                  # the public way: lists it among Hydra's launchers
        plugins.class_name_to_class[name] = cls   # and under the name the configs use


class RegisterLaunchers(Callback):
    """hydra.callbacks entry of conf/hydra/launcher/*.yaml: registering happens at import; nothing per event."""


register_launchers()
