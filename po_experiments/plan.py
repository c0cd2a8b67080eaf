"""The plan of a run before any work: per stage its optimizer steps, checkpoints, per-device micro-batch and
gradient accumulation, estimated peak memory per device and per node, estimated time, and whether it fits.

Nothing is loaded: sizes come from each model's architecture (`model.shape`, or a local folder's config.json),
data sizes from the known row counts (`data.<source>.rows`). `python run.py ... dry_run=true` prints the plan
and writes plan.json; every run checks its plan at validation and chooses the micro-batch from it when
`per_device_batch_size` is unset, so the global batch stays the paper's and a run does not OOM by construction.

The memory model (bytes per device) counts what training keeps: weights, gradients and AdamW states by
precision and ZeRO stage, the activations autograd saves per token and layer, the logits and their float32
copies, and for generation the weights plus the KV cache. `scripts/measure_memory.py` checks it against
measured peaks.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from . import run_length

log = logging.getLogger(__name__)

GB = 1024 ** 3
NODE_HOST_GB = 128.0  # a GPU node's memory when planning from a CPU machine (conf/hydra/launcher/slurm.yaml's mem_gb)
SHARD_GB = 5.0  # the largest safetensors shard a rank holds on the host while loading (meta-device loading)
HOST_BASE_GB = 3.0  # one process: Python, torch, CUDA context's host side, tokenizer, dataset in RAM
DEVICE_BASE_GB = 1.0  # CUDA context and allocator slack on each GPU
# Known sizes of the paper's data sets (rows of the configured split), for step counts without downloading.


@dataclass
class Shape:
    """A decoder-only transformer's size (the fields of its config.json that memory depends on)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    gated_mlp: bool = False  # SwiGLU with RMSNorm (Llama, Qwen) vs GELU with LayerNorm and biases (GPTNeoX)
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys

    @property
    def kv_dim(self) -> int:
        head = self.head_dim or self.hidden_size // self.num_attention_heads
        return head * (self.num_key_value_heads or self.num_attention_heads)

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden_size // self.num_attention_heads) * self.num_attention_heads

    @property
    def n_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attention = h * self.q_dim * 2 + h * self.kv_dim * 2
        mlp = h * i * (3 if self.gated_mlp else 2)
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        norms = h if self.gated_mlp else 2 * h  # RMSNorm: a weight; LayerNorm: weight and bias
        head = self.q_dim // self.num_attention_heads
        per_layer = attention + mlp + 2 * norms + (2 * head if self.qk_norm else 0)
        return self.num_hidden_layers * per_layer + embeddings + norms

    @classmethod
    def from_hf_config(cls, c: dict) -> "Shape":
        arch = " ".join(c.get("architectures") or [])
        gated = "hidden_act" in c and "NeoX" not in arch and c.get("model_type") not in ("gpt_neox", "gpt2")
        return cls(hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
                   num_attention_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                   vocab_size=c["vocab_size"], num_key_value_heads=c.get("num_key_value_heads"),
                   head_dim=c.get("head_dim"), tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                   gated_mlp=gated, qk_norm=c.get("model_type") in ("qwen3", "qwen3_moe"))


def model_shape(model_cfg, vocab_size: int | None = None) -> Shape:
    """The policy's shape: a local folder's config.json, the tiny model's `arch`, or the stored `shape`."""
    if model_cfg.path is not None and (Path(model_cfg.path) / "config.json").is_file():
        return Shape.from_hf_config(json.loads((Path(model_cfg.path) / "config.json").read_text()))
    if model_cfg.path is None:
        a = model_cfg.arch
        return Shape(hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
                     num_attention_heads=a.num_attention_heads, intermediate_size=a.intermediate_size,
                     vocab_size=vocab_size or 64)
    if model_cfg.get("shape") is None:
        from .errors import ConfigError

        raise ConfigError(f"model.shape: {model_cfg.path} is not a local folder, so the plan needs its architecture "
                          "(hidden_size, num_hidden_layers, ... as in its config.json) under model.shape")
    return Shape(**OmegaConf.to_container(model_cfg.shape, resolve=True))


def reward_shape(reward_cfg) -> Shape | None:
    path = reward_cfg.get("path")
    if path is not None and (Path(path) / "config.json").is_file():
        return Shape.from_hf_config(json.loads((Path(path) / "config.json").read_text()))
    if reward_cfg.get("shape") is not None:
        return Shape(**OmegaConf.to_container(reward_cfg.shape, resolve=True))
    return None


# ------------------------------------------------------------------------------------------ the hardware


@dataclass
class Hardware:
    gpus: int  # GPUs of the job, one process each (0: CPU processes)
    gpus_per_node: int
    gpu_memory_gb: float  # of one device (the host's memory on CPU)
    host_memory_gb: float  # of one node
    source: str  # where these figures came from
    cpu_processes: int = 1  # gpus == 0: the job's processes on this CPU (gloo)

    @property
    def world(self) -> int:
        return self.gpus if self.gpus else self.cpu_processes

    @property
    def nodes(self) -> int:
        return max(1, math.ceil(self.world / max(1, self.gpus_per_node)))


def _this_machine_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def _launcher(cfg) -> dict | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
        return OmegaConf.to_container(launcher, resolve=False) if "gpus_per_node" in launcher else None
    except Exception:  # no Hydra job (scripts, tests) or a launcher without GPUs
        return None


def hardware(cfg) -> Hardware:
    """plan.* where set; else the SLURM launcher's nodes x gpus_per_node and mem_gb; else this machine."""
    import torch

    p, launcher = cfg.plan, _launcher(cfg)
    if launcher is not None:
        per_node, source = int(launcher.get("gpus_per_node") or 1), "launcher config"
        gpus, host = int(launcher.get("nodes") or 1) * per_node, float(launcher.get("mem_gb") or 0) or None
        gpu_mem = 80.0  # the GPU the paper's clusters have: say plan.gpu_memory_gb when yours differs
    elif torch.cuda.is_available():
        gpus = per_node = torch.cuda.device_count()
        gpu_mem = torch.cuda.get_device_properties(0).total_memory / GB
        host, source = _this_machine_memory_gb(), "this machine"
    else:
        gpus, per_node, gpu_mem, host, source = 0, 1, None, None, "this machine (CPU)"
    gpus = p.gpus if p.gpus is not None else gpus
    per_node = p.gpus_per_node or (min(gpus, 8) if p.gpus is not None and launcher is None else per_node) or 1
    if host is None and gpus:
        host = NODE_HOST_GB
    host = p.host_memory_gb or host or _this_machine_memory_gb()
    gpu_mem = p.gpu_memory_gb or gpu_mem or (host if gpus == 0 else 80.0)
    if any(v is not None for v in (p.gpus, p.gpu_memory_gb, p.host_memory_gb)):
        source = f"plan.* settings over {source}"
    from .distributed import job_world

    return Hardware(gpus=gpus, gpus_per_node=max(1, per_node), gpu_memory_gb=gpu_mem, host_memory_gb=host,
                    source=source, cpu_processes=job_world() if gpus == 0 else 1)


# ------------------------------------------------------------------------------------------ memory model


@dataclass
class Precision:
    weight_bytes: int  # trained weights (4: float32 master weights)
    compute_bytes: int  # activations (2 under bf16/fp16 autocast)
    autocast: bool


def precision(model_cfg) -> Precision:
    low = model_cfg.dtype != "float32"
    if low and model_cfg.pure_low_precision:
        return Precision(2, 2, False)
    return Precision(4, 2 if low else 4, low)


def zero_stage(cfg) -> int:
    return int(((cfg.deepspeed.config or {}).get("zero_optimization") or {}).get("stage") or 0)


CONF = Path(__file__).resolve().parents[1] / "conf"
ZERO_CHOICES = ("none", "zero2", "zero3")


def _with_deepspeed(cfg, name: str):
    cfg = cfg.copy()
    OmegaConf.set_readonly(cfg, False)
    cfg.deepspeed.name = name
    cfg.deepspeed.config = OmegaConf.load(CONF / "deepspeed" / f"{name}.yaml").config
    return cfg


def resolve_deepspeed(cfg):
    """`deepspeed=auto`: the config with the least sharding under which every stage fits (none for one process);
    the largest one when none fits (the plan then says so). Other choices are returned as they are."""
    if cfg.deepspeed.name != "auto":
        return cfg
    planned = for_this_job(cfg) if not cfg.dry_run else cfg
    if hardware(planned).world == 1:
        return _with_deepspeed(cfg, "none")
    choices = ZERO_CHOICES
    for name in choices:
        candidate = _with_deepspeed(cfg, name)
        if make_plan(_with_deepspeed(planned, name))["fits"]:
            log.info("deepspeed=auto: %s (the least sharding under which every stage fits)", name)
            return candidate
    return _with_deepspeed(cfg, choices[-1])


def training_state_bytes(n_params: int, prec: Precision, zero: int, world: int) -> float:
    """Weights, gradients and AdamW's two moments of one trained model, per device."""
    if zero >= 2 and prec.autocast:  # DeepSpeed keeps bf16 weights and partitions fp32 master + moments + grads
        shard = (4 + 8 + 4) * n_params / world
        replicated = 2 * n_params if zero == 2 else 2 * n_params / world
        buffers = 2 * 5e8 * 2  # reduce / all-gather buckets (conf/deepspeed: 5e8 elements)
        return replicated + shard + buffers
    w = prec.weight_bytes
    per_device = w * n_params * 4  # weights, gradients, exp_avg, exp_avg_sq in the weights' dtype
    if zero == 3:
        per_device /= world
    elif zero == 2:
        per_device = w * n_params * 2 + w * n_params * 2 / world
    cache = 2 * n_params / (world if zero == 3 else 1) if prec.autocast else 0  # autocast's low-precision copy
    return per_device + cache


def activation_bytes(shape: Shape, prec: Precision, tokens: int, checkpointing: bool) -> float:
    """What autograd keeps for the backward of `tokens` tokens: per layer the residual stream and norms in float32
    and the projections' outputs in the compute dtype (attention through SDPA: no T x T scores), plus the logits
    with their float32 log-softmax and its gradient."""
    h, i, a = shape.hidden_size, shape.intermediate_size, prec.compute_bytes
    mlp = (4 if shape.gated_mlp else 2) * i
    per_layer = tokens * (4 * 4 * h + a * (2 * h + shape.q_dim + 2 * shape.kv_dim + h + mlp))
    layers = shape.num_hidden_layers
    saved = tokens * 4 * h * layers + per_layer if checkpointing else per_layer * layers
    logits = tokens * shape.vocab_size * (a + 4 + 4 + 4)
    return saved + logits


def kv_cache_bytes(shape: Shape, batch: int, tokens: int, dtype_bytes: int) -> float:
    return 2 * shape.num_hidden_layers * batch * tokens * shape.kv_dim * dtype_bytes


def generation_bytes(shape: Shape, n_params: int, dtype_bytes: int, batch: int, prompt: int, new: int) -> float:
    """Greedy / sampled generation: the weights, the KV cache at full length, the prefill's activations of one
    layer and the last position's float32 logits."""
    prefill = batch * prompt * (shape.hidden_size * 6 + shape.intermediate_size * 2) * dtype_bytes
    return (n_params * dtype_bytes + kv_cache_bytes(shape, batch, prompt + new, dtype_bytes) + prefill
            + batch * shape.vocab_size * 4 * 2)


def inference_bytes(n_params: int, shape: Shape, dtype_bytes: int, tokens: int) -> float:
    """A frozen model's forward without gradients (reference, reward model): weights + one layer's activations
    + logits (the reward head reads one position: `lm_logits=False`)."""
    return n_params * dtype_bytes + tokens * (shape.hidden_size * 8 + shape.intermediate_size * 2) * dtype_bytes


# ------------------------------------------------------------------------------------------ the stages


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


@dataclass
class StagePlan:
    steps: int | None
    checkpoints: int
    per_device_batch: int | None
    grad_accum: int | None
    peak_gpu_gb: float
    host_gb: float
    fits: bool
    time_h: float | None = None
    detail: str = ""
    advice: str = ""


def _micro_batch(global_batch: int, world: int, budget: float, cost, fixed: int | None) -> tuple[int, int, float]:
    """The largest per-device batch dividing the per-process share of `global_batch` whose `cost(b)` fits."""
    share, rest = divmod(global_batch, world)
    if rest or share == 0:
        from .errors import ConfigError

        raise ConfigError(f"batch_size={global_batch} is not a multiple of the job's {world} processes")
    candidates = [fixed] if fixed else _divisors_desc(share)
    for b in candidates:
        if cost(b) <= budget:
            return b, share // b, cost(b)
    b = candidates[-1]
    return b, share // b, cost(b)


def _train_time_h(n_params: int, tokens_per_step: int, steps: int | None, hw: Hardware, cfg, factor=6.0):
    if steps is None or hw.gpus == 0:
        return None
    flops = factor * n_params * tokens_per_step * steps
    return flops / (hw.world * cfg.plan.gpu_tflops * 1e12 * cfg.plan.mfu) / 3600


def rows(cfg, source: str) -> int | None:
    """Rows a stage reads: the synthetic task's sizes, or a paper data set's known (or max_rows-capped) size."""
    from .tasks import task_of  # the data layer, imported when a plan is made (config validation stays light)

    return task_of(cfg).rows(cfg, source)


class Planner:
    """One run's plan: built from its config alone."""

    def __init__(self, cfg, vocab_size: int | None = None):
        self.cfg, self.hw = cfg, hardware(cfg)
        self.shape = model_shape(cfg.model, vocab_size or self._tiny_vocab(cfg))
        self.P = self.shape.n_params
        self.prec = precision(cfg.model)
        self.zero = zero_stage(cfg)
        from .models import activation_checkpointing

        self.checkpointing = activation_checkpointing(cfg.model)
        self.budget = self.hw.gpu_memory_gb * GB * cfg.plan.headroom - (DEVICE_BASE_GB * GB if self.hw.gpus else 0)
        self.host_budget = self.hw.host_memory_gb * GB * cfg.plan.headroom

    @staticmethod
    def _tiny_vocab(cfg) -> int | None:
        if cfg.model.path is None and cfg.data.name == "synthetic":
            return 2 * cfg.data.vocab_size + 8  # words s*, t* and the specials (models.build_word_tokenizer)
        return None

    # -- host memory per node: each rank streams the weights shard by shard onto its device (a CPU process holds
    # them whole), plus the process itself
    def _host(self, *model_bytes: float) -> float:
        if self.hw.gpus == 0:
            return HOST_BASE_GB * GB + sum(model_bytes)
        per_rank = HOST_BASE_GB * GB + min(max(model_bytes, default=0.0), SHARD_GB * GB)
        return per_rank * min(self.hw.world, self.hw.gpus_per_node)

    def _device_peak(self, value: float) -> float:
        return value + (DEVICE_BASE_GB * GB if self.hw.gpus else 0)

    def _fits(self, device: float, host: float) -> bool:
        if self.hw.gpus == 0:  # CPU processes share the host's memory
            return device * self.hw.world <= self.host_budget
        return device <= self.hw.gpu_memory_gb * GB * self.cfg.plan.headroom and host <= self.host_budget

    def training(self, hp, *, rows_: int | None, seq_len: int, seqs_per_example: int, checkpointing: bool,
                 extra_device: float = 0.0, extra_tokens_factor: float = 6.0, name: str = "", count=None) -> StagePlan:
        world = self.hw.world
        state = training_state_bytes(self.P, self.prec, self.zero, world)

        def cost(b):
            return state + extra_device + activation_bytes(self.shape, self.prec, b * seqs_per_example * seq_len,
                                                           checkpointing)

        b, accum, peak = _micro_batch(hp.batch_size, world, self.budget, cost, hp.per_device_batch_size)
        steps = (count or run_length.optimizer_steps)(hp, rows_)
        save = hp.save_steps
        host = self._host(self.P * 2)
        device = self._device_peak(peak)
        fits = self._fits(device, host)
        tokens = hp.batch_size * seqs_per_example * seq_len
        return StagePlan(steps=steps, checkpoints=(steps // save if steps and save else 0), per_device_batch=b,
                         grad_accum=accum, peak_gpu_gb=device / GB, host_gb=host / GB, fits=fits,
                         time_h=_train_time_h(self.P, tokens, steps, self.hw, self.cfg,
                                              extra_tokens_factor + (2 if checkpointing else 0)),
                         detail=f"{self.P / 1e9:.2f}B params, ZeRO-{self.zero}, {seq_len} tokens x "
                                f"{seqs_per_example} seq/example",
                         advice="" if fits else self._advice(name, b, checkpointing))

    def _advice(self, stage: str, batch: int, checkpointing: bool) -> str:
        tips = []
        if batch > 1:
            tips.append(f"model.{stage}.per_device_batch_size=1")
        if self.zero < 3 and self.hw.world > 1:
            tips.append("deepspeed=zero3" if self.zero else "deepspeed=zero2 or zero3")
        if self.hw.world == 1:
            tips.append("more GPUs (plan.gpus / hydra.launcher.gpus_per_node) with deepspeed=zero3")
        if not checkpointing:
            tips.append("model.activation_checkpointing=true")
        return "try " + ", ".join(tips) if tips else "a larger GPU"

    def sft(self) -> StagePlan:
        m = self.cfg.model
        return self.training(m.sft, rows_=rows(self.cfg, "sft"), seq_len=m.max_length, seqs_per_example=1,
                             checkpointing=self.checkpointing, name="sft")

    def dpo(self) -> StagePlan:
        m = self.cfg.model
        pairs = rows(self.cfg, "preferences")
        # reference log-probs are precomputed by the same model before training (no second copy kept)
        factor = 6.0 + (2.0 / self.cfg.model.dpo.epochs if self.cfg.runtime.precompute_ref else 2.0)
        ref = 0.0 if self.cfg.runtime.precompute_ref else self.P * 2
        return self.training(m.dpo, rows_=pairs, seq_len=m.max_length, seqs_per_example=2,
                             checkpointing=self.checkpointing, extra_device=ref, extra_tokens_factor=factor, name="dpo")

    def ppo(self) -> StagePlan:
        hp = self.cfg.model.ppo
        seq = hp.max_prompt_length + hp.max_new_tokens
        rm = reward_shape(self.cfg.reward)
        rm_bytes = 0.0 if rm is None else inference_bytes(rm.n_params, rm, 2, seq * 8)
        ref_bytes = inference_bytes(self.P, self.shape, 2, seq * 8)
        shard = self.hw.world if self.zero == 3 else 1
        from .objectives.policy_gradient import needs_critic

        critic = needs_critic(self.cfg.algo)  # GRPO, DAPO, RLOO, REINFORCE++: no value model
        k = run_length.group_size(self.cfg)
        value_state = training_state_bytes(self.P, self.prec, self.zero, self.hw.world) if critic else 0.0
        gen = generation_bytes(self.shape, 0, 2, 8, hp.max_prompt_length, hp.max_new_tokens)
        extra = value_state + (ref_bytes + rm_bytes) / shard + gen
        plan = self.training(hp, rows_=rows(self.cfg, "preferences"), seq_len=seq, seqs_per_example=2,
                             checkpointing=self.checkpointing, extra_device=extra, extra_tokens_factor=14.0,
                             name="ppo", count=lambda hp, n: run_length.ppo_updates(hp, n, k))
        rm_size = "none" if rm is None else f"{rm.n_params / 1e9:.1f}B"
        plan.detail += f"; + {'value model, ' if critic else ''}reference, reward model ({rm_size})"
        host = self._host(self.P * 2, (rm.n_params * 2) if rm else 0)
        plan.host_gb, plan.fits = host / GB, self._fits(plan.peak_gpu_gb * GB, host)
        return plan

    def generation_stage(self, n_prompts: int | None, prompt_len: int, new_tokens: int, batch: int | None,
                         checkpoints: int) -> StagePlan:
        world = self.hw.world
        dtype = 2 if (self.hw.gpus and self.cfg.model.dtype != "float32") else 4

        def cost(b):
            return generation_bytes(self.shape, self.P, dtype, b, prompt_len, new_tokens)

        if batch is None:
            b = next((b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if cost(b) <= self.budget), 1)
        else:
            b = batch
        device = self._device_peak(cost(b))
        host = self._host(self.P * dtype)
        time_h = None
        if self.hw.gpus and n_prompts:
            # a decoding step reads every weight once (2 TB/s per GPU assumed), and HF generate spends about
            # half a millisecond per layer per step on kernel launches, whichever is larger
            step_s = max(self.P * dtype / 2e12, self.shape.num_hidden_layers * 5e-4)
            per_rank = math.ceil(n_prompts / world)
            time_h = (checkpoints + 1) * math.ceil(per_rank / b) * new_tokens * step_s / 3600
        fits = self._fits(device, host)
        return StagePlan(steps=None, checkpoints=checkpoints, per_device_batch=b, grad_accum=None,
                         peak_gpu_gb=device / GB, host_gb=host / GB, fits=fits, time_h=time_h,
                         detail=f"{n_prompts} prompts x {new_tokens} new tokens at {checkpoints} checkpoints + SFT",
                         advice="" if fits else "lower eval.batch_size")

    def analysis(self, checkpoints: int) -> StagePlan:
        an, m = self.cfg.analysis, self.cfg.model
        seq = m.max_length if self.cfg.algo.family == "dpo" else m.ppo.max_prompt_length + m.ppo.max_new_tokens
        sequences = 2 * an.dpo_batch_size if self.cfg.algo.family == "dpo" else an.ppo_batch_size
        dtype = 2 if an.dtype == "bfloat16" else 4
        shard = self.hw.world if self.zero == 3 else 1
        prec = Precision(dtype, dtype, False)
        model = self.P * dtype / shard
        method = self.method()
        targets = len(an.get("targets") or ["dprime"])  # analysis.targets: one g' per target
        gp = self.P * dtype * (targets if self._stacked_targets(targets, dtype) else 1)
        if shard > 1 and self.cfg.algo.family == "dpo":
            # analysis/sharded.py: a mini-batch's rows split over the ranks, each rank its gradient and g' partition
            method = "zero3-sharded"
            rows_per_rank = math.ceil(sequences / shard)
            work = (1 + targets) * self.P * 4 / shard + activation_bytes(self.shape, prec, rows_per_rank * seq, False)
        else:
            acts = activation_bytes(self.shape, prec, sequences * seq, checkpointing=False)
            if method == "vmap":
                work = min(an.chunk, sequences) * self.P * dtype + gp + acts  # a chunk's per-sequence gradients
            else:  # ghost / forward mode: g' (per parameter, the model's dtype; tangents are views of it) and one
                # mini-batch's activations (the ghost pass's backward; forward mode keeps one layer's at a time)
                work = gp + acts
        device = self._device_peak(model + work)
        host = self._host(self.P * dtype)
        fits = self._fits(device, host)
        return StagePlan(steps=None, checkpoints=checkpoints, per_device_batch=sequences, grad_accum=None,
                         peak_gpu_gb=device / GB, host_gb=host / GB, fits=fits,
                         detail=f"method={method}, {an.n_pairs} samples in mini-batches of {sequences} sequences",
                         advice="" if fits else self._analysis_advice(method))

    def _stacked_targets(self, targets: int, dtype: int) -> bool:
        """analysis.targets_pass (the stage's rule, analysis.stage.stacked_targets): stacked g' or one per pass."""
        from .config import STACKED_SHARE

        mode = self.cfg.analysis.get("targets_pass", "auto")
        if mode != "auto":
            return mode == "stacked"
        return self.hw.gpus == 0 or targets * self.P * dtype <= STACKED_SHARE * self.hw.gpu_memory_gb * GB

    def _analysis_advice(self, method: str) -> str:
        tips = ["analysis.dtype=bfloat16"] if self.cfg.analysis.dtype == "float32" else []
        tips += ["analysis.method=ghost"] if method == "vmap" else []
        tips += ["smaller analysis.dpo_batch_size / ppo_batch_size"]
        if self.cfg.algo.family == "dpo":
            tips.append("deepspeed=zero3 with more GPUs (a sharded analysis)")
        return "try " + ", ".join(tips)

    def method(self) -> str:
        from .analysis.gradients import choose_method

        if self.cfg.algo.family == "ppo":
            return "jvp"  # token-weighted components: forward mode per layer group, a ghost pass for the norm
        return choose_method(self.cfg.analysis.method, self.P, self.cfg.analysis.vmap_max_params)

    def stages(self) -> dict[str, StagePlan]:
        cfg, out = self.cfg, {}
        if cfg.sft.enabled or cfg.data.name == "synthetic":  # the embedded task's pairs come from its SFT model
            out["sft"] = self.sft()
        if cfg.algo.family == "ppo":
            out["ppo"] = po = self.ppo()
        else:
            out["dpo"] = po = self.dpo()
        ckpts = po.checkpoints if cfg.eval.checkpoints == "all" else 1
        if cfg.eval.judge != "none":
            out["win_rate"] = self.generation_stage(*win_rate_generation(cfg), cfg.eval.batch_size, ckpts)
        if cfg.analysis.enabled:
            out["analysis"] = self.analysis(po.checkpoints)
        return out


def win_rate_generation(cfg, new_tokens: int | None = None) -> tuple[int | None, int, int]:
    """The win-rate stage's prompts, prompt length and new tokens per prompt, as the plan sizes them."""
    n_eval = cfg.eval.n_prompts or rows(cfg, "instructions")
    new_eval = new_tokens or cfg.eval.max_new_tokens or cfg.data.max_new_tokens
    prompt_len = min(cfg.model.max_length, 512) if cfg.data.name != "synthetic" else cfg.model.max_length
    return n_eval, prompt_len, new_eval


def generation_batch(cfg, new_tokens: int | None = None) -> int:
    """Prompts per generate call on one device: `eval.batch_size` when set, else the largest batch whose weights,
    KV cache and logits fit this job's device (the plan's win-rate stage; `new_tokens` for D')."""
    if cfg.eval.batch_size is not None:
        return int(cfg.eval.batch_size)
    n_prompts, prompt_len, new = win_rate_generation(cfg, new_tokens)
    return Planner(for_this_job(cfg)).generation_stage(n_prompts, prompt_len, new, None, 1).per_device_batch


def make_plan(cfg, vocab_size: int | None = None) -> dict:
    planner = Planner(cfg, vocab_size)
    stages = planner.stages()
    return {
        "hardware": asdict(planner.hw),
        "model": {"name": cfg.model.name, "params": planner.P, "dtype": cfg.model.dtype,
                  "master_weights": "float32" if planner.prec.weight_bytes == 4 else cfg.model.dtype,
                  "zero_stage": planner.zero},
        "stages": {name: asdict(s) for name, s in stages.items()},
        "fits": all(s.fits for s in stages.values()),
        # the PO run's length in its step unit and every step-valued setting against it (README "Paper presets")
        "run_length": run_length.check(cfg, rows(cfg, "preferences"), where="plan"),
    }


def format_plan(plan: dict) -> str:
    hw, m = plan["hardware"], plan["model"]
    lines = [f"plan for {m['name']} ({m['params'] / 1e9:.3f}B params, {m['dtype']} compute, "
             f"{m['master_weights']} weights, ZeRO-{m['zero_stage']}) on {hw['gpus']} GPU(s) x "
             f"{hw['gpu_memory_gb']:.0f} GB, {hw['host_memory_gb']:.0f} GB host per node ({hw['source']})",
             f"{'stage':<10}{'steps':>8}{'ckpts':>7}{'micro':>7}{'accum':>7}{'GPU GB':>9}{'host GB':>9}"
             f"{'time h':>8}  fits"]
    for name, s in plan["stages"].items():
        def cell(v, fmt="{}"):
            return "-" if v is None else fmt.format(v)
        lines.append(f"{name:<10}{cell(s['steps']):>8}{s['checkpoints']:>7}{cell(s['per_device_batch']):>7}"
                     f"{cell(s['grad_accum']):>7}{s['peak_gpu_gb']:>9.1f}{s['host_gb']:>9.1f}"
                     f"{cell(s['time_h'], '{:.2f}'):>8}  {'yes' if s['fits'] else 'NO: ' + s['advice']}")
    lines += format_run_length(plan.get("run_length"))
    return "\n".join(lines)


def format_run_length(record: dict | None) -> list[str]:
    if not record or record.get("steps") is None:
        return []
    lines = [f"{record['stage']} run: {record['steps']} steps, one = {record['unit']}"]
    lines += [f"  {s['key']} = {s['value']:g}: {'inside' if s['inside'] else 'OUTSIDE'} ({s['rule']})"
              for s in record["settings"]]
    return lines


def not_fitting(plan: dict) -> list[str]:
    return [f"stage {name} needs {s['peak_gpu_gb']:.1f} GB per GPU / {s['host_gb']:.1f} GB host per node, more than "
            f"{plan['hardware']['gpu_memory_gb']:.0f} / {plan['hardware']['host_memory_gb']:.0f} GB: {s['advice']}"
            for name, s in plan["stages"].items() if not s["fits"]]


def for_this_job(cfg):
    """The config planned on the job's real processes (the devices it runs on), unless plan.gpus says otherwise."""
    import torch

    from . import distributed

    if cfg.plan.gpus is not None:
        return cfg
    cfg = cfg.copy()
    OmegaConf.set_readonly(cfg, False)
    cfg.plan.gpus = distributed.job_world() if torch.cuda.is_available() else 0
    return cfg


def micro_batch(cfg, stage: str) -> int:
    """The planner's per-device micro-batch for a training stage (sft | dpo | ppo) of this job."""
    return getattr(Planner(for_this_job(cfg)), stage)().per_device_batch


def write_plan(plan: dict, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan, indent=2))
    return path


def check(cfg) -> dict:
    """The run's plan; a ConfigError naming the stages that do not fit (unless plan.check=false: then a warning)."""
    from .errors import ConfigError

    plan = make_plan(cfg if cfg.dry_run else for_this_job(cfg))
    problems = not_fitting(plan)
    if problems and not cfg.dry_run:
        message = "plan: " + "; ".join(problems) + " (plan.check=false runs anyway; dry_run=true shows the plan)"
        if cfg.plan.check:
            raise ConfigError(message)
        log.warning(message)
    return plan
