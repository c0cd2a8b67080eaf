"""One job, several processes: the distributed environment and what the ranks of a job do together.

A job runs as N processes (torchrun, `accelerate launch`, or N SLURM tasks from `srun` / submitit's
`tasks_per_node`), one per GPU. Every rank runs the same pipeline; training stages (SFT, DPO, PPO) and the
sharded G analysis are collective, the rest (preference pairs, evaluation, summary) is done by rank 0 while
the others wait for its files. A single process is the same code with a world of one.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from datetime import timedelta

log = logging.getLogger(__name__)
_solo = False  # inside `main_first` on rank 0: the other ranks are waiting, so act as a world of one


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list ("gpu[003-005,007],cpu1" -> "gpu003"), by scontrol where it exists."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
        return m.group(1) + (m.group(2) or "")


def env_from_slurm(environ=os.environ) -> dict[str, str]:
    """torch.distributed's variables for a process that is one task of a multi-task SLURM step (srun), or {}.

    Nothing is returned when a launcher already set them (torchrun inside an allocation) or the step has a
    single task (one process per job, the CPU default)."""
    if "RANK" in environ or int(environ.get("SLURM_NTASKS", environ.get("SLURM_STEP_NUM_TASKS", "1"))) <= 1:
        return {}
    if "SLURM_PROCID" not in environ:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST", "localhost"))
    job_id = int(environ.get("SLURM_JOB_ID", "0"))
    tasks_here = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "1"))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_NTASKS", environ.get("SLURM_STEP_NUM_TASKS")),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": re.match(r"\d+", tasks_here).group(0),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or _first_host(nodelist),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job_id % 20000),  # one port per job on a node
    }


def setup(cfg) -> None:
    """Before anything touches torch.distributed: SLURM's variables, DeepSpeed's CPU accelerator, and one
    process group (long timeout: rank 0 may build a cache or evaluate while the others wait)."""
    import torch

    os.environ.update(env_from_slurm())
    if cfg.deepspeed.name != "none" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: gloo, its shm ops JIT-built once
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=cfg.runtime.dist_timeout_s))
        log.info("process %d of %d (%s, backend %s)", state.process_index, state.num_processes, state.device,
                 state.backend)


def end_of_training() -> None:
    """After a DeepSpeed training stage: models loaded from now on are whole again. (While TrainingArguments'
    ZeRO-3 config is registered, `from_pretrained` partitions every model it loads, a collective step that
    would hang rank 0 loading a checkpoint alone to evaluate it.)"""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    restore_torch_linear()


def restore_torch_linear() -> None:
    """ZeRO-3's zero.Init swaps torch.nn.functional.linear for its memory-efficient autograd Function "until manually
    reset"; that Function has no forward-mode rule, which the G analysis (jvp) needs on the models it loads."""
    import sys

    import torch

    module = sys.modules.get("deepspeed.runtime.zero.partition_parameters")  # never imported: nothing swapped
    original = getattr(getattr(module, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original


def job_world() -> int:
    """The job's processes, known from the launcher's variables before the process group exists."""
    if _initialised():
        return world()
    return int(os.environ.get("WORLD_SIZE") or env_from_slurm().get("WORLD_SIZE") or 1)


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _initialised() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _initialised() else 0


def is_main() -> bool:
    return rank() == 0


def _initialised() -> bool:
    import torch.distributed as dist

    return not _solo and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialised():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value):
    """Rank 0's value on every rank (any picklable object)."""
    if not _initialised():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(work):
    """Rank 0 runs `work()` while the others wait; then every rank gets its result (e.g. a cached folder).
    Inside `work`, rank 0 is a world of one (nested `main_first`, barriers and caches just run)."""
    global _solo
    if not _initialised():
        return work()
    result, error = None, None
    if is_main():
        _solo = True
        try:
            result = work()
        except BaseException as err:  # the others must not wait for a result that will never come
            error = err
        finally:
            _solo = False
    barrier()
    failed, result = broadcast((error is not None, result))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank {rank()}: rank 0 failed in work this rank was waiting for (see rank 0's log)")
    return result
