"""One entry for the texts a saved model generates (win-rate outputs, D' answers): `generation.backend=hf`
decodes with HF generate in this process, in batches of `plan.generation_batch`; `generation.backend=vllm` runs
`vllm_worker.py` under `generation.vllm_python` (an interpreter whose environment has vLLM; its torch and
transformers may differ from the training stack's) on the saved folder and reads its outputs back.
PPO rollouts are not generated here: they need the live policy's weights every step, so they stay HF generate."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("vllm_worker.py")
# torchrun / accelerate / SLURM rendezvous variables: vLLM would read them as its own distributed setup
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
IMPORT_CHECK_TIMEOUT_S = 300


def vllm_python(cfg) -> str:
    return cfg.generation.vllm_python or sys.executable


def backend(cfg) -> str:
    value = cfg.generation.backend
    return getattr(value, "value", value)


def generate_texts(cfg, model_dir: Path, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                   seed: int = 0, min_new_tokens: int = 0, desc: str = "generating",
                   new_tokens_for_plan: int | None = None) -> list[str]:
    """The completions of the model saved in `model_dir` for text prompts, in order (greedy at temperature 0)."""
    if backend(cfg) == "vllm":
        return vllm_generate(cfg, model_dir, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed, min_new_tokens=min_new_tokens, desc=desc)
    from ..models import load_for_inference
    from ..plan import generation_batch
    from .local import generate

    model, tokenizer = load_for_inference(model_dir, cfg.model.dtype)
    batch = generation_batch(cfg, new_tokens_for_plan or max_new_tokens)
    log.info("%s: HF generate, %d prompts in batches of %d", desc, len(prompts), batch)
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch,
                    temperature=temperature, seed=seed, desc=desc, min_new_tokens=min_new_tokens)


def worker_env(one_device: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    if one_device and "LOCAL_RANK" in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["LOCAL_RANK"]  # this rank's GPU, not GPU 0 of every rank
    return env


def release_cached_gpu_memory() -> None:
    """The engine sizes its KV cache from the GPU memory free at its start: hand back what this process's
    allocator keeps cached from training (models already dropped)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def vllm_generate(cfg, model_dir: Path, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int,
                  min_new_tokens: int, desc: str) -> list[str]:
    g = cfg.generation
    request = {"model": str(model_dir), "prompts": list(prompts), "max_new_tokens": int(max_new_tokens),
               "temperature": float(temperature), "seed": int(seed), "min_new_tokens": int(min_new_tokens),
               "dtype": cfg.model.dtype, "gpu_memory_utilization": float(g.vllm_gpu_memory_utilization),
               "tensor_parallel_size": int(g.vllm_tensor_parallel_size)}
    release_cached_gpu_memory()
    with tempfile.TemporaryDirectory(prefix="po-vllm-") as tmp:
        req, resp = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req.write_text(json.dumps(request))
        log.info("%s: vLLM (%s) on %s, %d prompts", desc, vllm_python(cfg), model_dir, len(prompts))
        proc = subprocess.run([vllm_python(cfg), str(WORKER), str(req), str(resp)],
                              env=worker_env(one_device=int(g.vllm_tensor_parallel_size) == 1),
                              capture_output=True, text=True, timeout=g.vllm_timeout_s, check=False)
        if proc.returncode != 0 or not resp.exists():
            raise RuntimeError(f"generation.backend=vllm: the worker ({vllm_python(cfg)} {WORKER.name}) failed on "
                               f"{model_dir} with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
        response = json.loads(resp.read_text())
    outputs = response["outputs"]
    if len(outputs) != len(prompts):
        raise RuntimeError(f"generation.backend=vllm: {len(outputs)} outputs for {len(prompts)} prompts")
    log.info("%s: %d outputs in %.0f s (vLLM, engine start included)", desc, len(outputs), response["seconds"])
    return outputs


def preflight(cfg) -> None:
    """generation.backend=vllm: the configured interpreter must import vllm (seconds, before any training)."""
    if backend(cfg) != "vllm":
        return
    python = vllm_python(cfg)
    try:
        proc = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, check=False,
                              timeout=IMPORT_CHECK_TIMEOUT_S, env=worker_env())
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"generation.backend=vllm: cannot run generation.vllm_python={python}: {err}") from err
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ConfigError(f"generation.backend=vllm: `{python} -c 'import vllm'` fails ({last}). Install vLLM in a "
                          "separate environment and set generation.vllm_python=/path/to/that/venv/bin/python, or use "
                          "generation.backend=hf")


def rank_slice(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of n prompts (the first n % world ranks take one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def shared_generate_texts(cfg, model_dir: Path, prompts: list[str], **kwargs) -> list[str]:
    """`generate_texts` with the prompts split over the job's ranks (every rank must call it with the same prompts,
    each on its own device, each running its own vLLM worker with that backend); every rank gets all outputs, in
    order. One process: `generate_texts` itself."""
    from .. import distributed

    world = distributed.world()
    if world == 1:
        return generate_texts(cfg, model_dir, prompts, **kwargs)
    import torch.distributed as dist

    mine = prompts[rank_slice(len(prompts), distributed.rank(), world)]
    outputs = generate_texts(cfg, model_dir, mine, **kwargs) if mine else []
    parts: list[list[str] | None] = [None] * world
    dist.all_gather_object(parts, outputs)
    return [o for part in parts for o in part]
