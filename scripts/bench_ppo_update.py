"""Time full PPO updates of our ComponentPPOTrainer against stock TRL PPOTrainer, side by side in one process.

One update = one rollout batch: generation, reference and value forwards, reward, advantages, then
`num_ppo_epochs` passes of minibatch updates (policy + value loss, backward, optimizer step), plus each loop's
logging and scheduler step, as each trainer's own `train()` runs it. A `TrainerCallback` reads the clock at
`on_train_begin` and at every `on_step_end` (both loops call `on_step_end` once per update and never call
`on_step_begin`), so an interval between two consecutive `on_step_end` calls is exactly one loop iteration of that
trainer; the first `--warmup` intervals of every block are discarded.

Identical settings: the policy, reference, value model and reward model start from deep copies of one init
(dropout off in all of them, as both trainers disable it); the reward model is a tiny randomly initialised
GPTNeoXForSequenceClassification on the policy's tokenizer: stock gets it in memory as `reward_model`, ours loads
the same weights from a temporary folder as a `ClassifierReward`, which is how a user runs ours (it scores
decoded text). One PPOConfig for both: batch = per_device_train_batch_size x gradient_accumulation_steps,
num_mini_batches=1, `local_rollout_forward_batch_size` = the whole batch (ours rolls out the whole batch at
once), whiten_rewards=False, missing_eos_penalty=None, stop_token="eos", constant learning rate, logging every
update, no sample generations, no checkpoints, no autocast (`--dtype` is the weights' dtype). Ours samples with
top_p=1.0 (stock always does) and runs with max_grad_norm=None, because stock's PPO loop never clips gradients;
weighting `ppo`, components [TOT]. Both trainers see the same prompt set every update (the dataset is exactly one
batch of prompts; each loop shuffles it its own way), so the context length is the same for both. The tqdm /
printer callbacks are removed from both (they would print every log line).

Stock's loop calls `gc.collect()` twice per update (after the rollout and after `on_step_end`); a full collection
walks every Python object of the process (~430k after importing TRL alone): ~0.2-0.3 s a call on the 2-core CPU
box this was written on. That is what a stock user pays, so the headline ratio includes it. The time of those
calls is also read (through a timing stand-in for `gc` inside TRL's PPO module, during `run` only), and a second,
diagnostic ratio against stock without them shows how the two loops' tensor work compares.

Blocks alternate (AB, BA, ...) over `--repeats`; each block is one `train()` call of `--warmup + --updates`
updates on the same two trainers (optimizer state carries over; both loops restart at update 1).

    python scripts/bench_ppo_update.py --model tiny --batch 64 --updates 6 --repeats 5 --threads 1
    python scripts/bench_ppo_update.py --model pythia-1b --batch 64 --micro-batch 8 --device cuda --dtype bfloat16

`--mode footprint` builds ours only and reports, per rollout+update, its time and the peak host memory (the
process's resident-set high-water mark, reset through /proc/self/clear_refs at the start of every update; on CUDA
also torch's peak allocated memory): what activation checkpointing (`--checkpointing`), the generation chunk
(`--generation-batch`) and behaviour log-probs from a forward pass cost or save. The same script run from a checkout
of an older trainer (it passes only the keyword arguments that trainer accepts) gives the "before" figures:

    python scripts/bench_ppo_update.py --mode footprint --model pythia-160m --prompt-len 256 --response-length 256 \
        --batch 2 --micro-batch 1 --ppo-epochs 1 --updates 1 --warmup 0 --threads 2 [--checkpointing]
"""
from __future__ import annotations

import argparse
import copy
import inspect
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as stock_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere
from po_experiments.bench import cli, quartiles, write_results  # noqa: E402
from po_experiments.config import PPOAlgoConfig  # noqa: E402
from po_experiments.data.synthetic import DictionaryTask  # noqa: E402
from po_experiments.models import DTYPES, build_tiny_model, build_word_tokenizer, set_threads  # noqa: E402
from po_experiments.rewards import ClassifierReward  # noqa: E402
from po_experiments.trainers.ppo import ComponentPPOTrainer  # noqa: E402

TARGET = 1.05
PYTHIA = {  # randomly initialised GPTNeoX of Pythia sizes: timing needs the shapes, not the weights
    "pythia-160m": (768, 12, 12, 3072), "pythia-410m": (1024, 24, 16, 4096),
    "pythia-1b": (2048, 16, 8, 8192), "pythia-2.8b": (2560, 32, 32, 10240),
}
PYTHIA_VOCAB = 50304
PYTHIA_RESPONSE_LENGTH = 128
REWARD_ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
PPO = PPOAlgoConfig()  # the project's PPO defaults: kl_coef, clip ranges, vf_coef, gamma, GAE lambda, epochs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", *PYTHIA])
    p.add_argument("--batch", type=int, default=64, help="prompts per update (the rollout batch)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="per_device_train_batch_size; batch / micro-batch = gradient_accumulation_steps (0: batch)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the pythia presets (tiny: task)")
    p.add_argument("--response-length", type=int, default=0,
                   help=f"new tokens per response (0: tiny.yaml's max_new_tokens, pythia {PYTHIA_RESPONSE_LENGTH})")
    p.add_argument("--ppo-epochs", type=int, default=PPO.num_ppo_epochs)
    p.add_argument("--updates", type=int, default=6, help="timed updates per trainer per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates at the start of every block")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (no autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = free cores")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (0: the model preset's PPO rate)")
    p.add_argument("--out", default=None, help="results file: .json or .csv")
    p.add_argument("--mode", default="compare", choices=["compare", "footprint"],
                   help="compare: ours vs stock TRL (time); footprint: ours only, time and peak memory per update")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing on policy and value (ours; stock's loop never enables it)")
    p.add_argument("--generation-batch", type=int, default=0,
                   help="ours: prompts per generate() call (0: the whole rollout batch)")
    p.add_argument("--rollout-only", action="store_true",
                   help="footprint: time and peak memory of rollouts alone (generation, behaviour/reference "
                        "log-probs, values, reward), --repeats of them, no update")
    args = p.parse_args(argv)
    args.micro_batch = args.micro_batch or args.batch
    if args.batch % args.micro_batch:
        p.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    if args.updates < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--updates and --repeats must be >= 1, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------ models and prompts
def tiny_setup(n_prompts: int):
    """The embedded task's word tokenizer, the tiny GPTNeoX of conf/model/tiny.yaml, and the task's prompts."""
    task = DictionaryTask.from_config()  # the task with its configured defaults
    tok = build_word_tokenizer(task.words)
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml").model
    model = build_tiny_model(model_cfg.arch, tok, seed=0)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in task.preference_prompts(n_prompts, 0)]
    hp = model_cfg.ppo
    return tok, model, prompts, {"response_length": int(hp.max_new_tokens), "lr": float(hp.learning_rate),
                                 "temperature": float(hp.temperature)}


def pythia_setup(name: str, n_prompts: int, prompt_len: int, response_length: int):
    """A random Pythia-shaped GPTNeoX on a word tokenizer of Pythia's vocabulary size, and random-word prompts of
    exactly `prompt_len` tokens ("<user> w.. <assistant>")."""
    tok = build_word_tokenizer([f"w{i}" for i in range(PYTHIA_VOCAB - 5)])  # 5 specials: vocab = 50304
    hidden, layers, heads, inter = PYTHIA[name]
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=inter, rotary_pct=0.25,
                           max_position_embeddings=max(2048, prompt_len + response_length + 8),
                           tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    rng = np.random.default_rng(0)
    texts = ["<user> " + " ".join(f"w{i}" for i in rng.integers(0, len(tok) - 5, size=prompt_len - 2))
             + " <assistant>" for _ in range(n_prompts)]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(len(x) == prompt_len for x in prompts)
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "pythia.yaml").model
    return tok, model, prompts, {"response_length": response_length, "lr": float(model_cfg.ppo.learning_rate),
                                 "temperature": float(model_cfg.ppo.temperature)}


def value_model_like(policy, tok, seed: int = 1):
    """Pythia-style value model: the policy's architecture with a 1-output score head, randomly initialised."""
    config = copy.deepcopy(policy.config)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(seed)
    return GPTNeoXForSequenceClassification(config)


def tiny_reward_model(tok, max_positions: int, seed: int = 2):
    """The shared reward model: a tiny random GPTNeoX sequence classifier on the policy's tokenizer."""
    config = GPTNeoXConfig(vocab_size=len(tok), max_position_embeddings=max(64, max_positions), num_labels=1,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **REWARD_ARCH)
    torch.manual_seed(seed)
    return GPTNeoXForSequenceClassification(config)


# ------------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA is asynchronous: the clock must wait for the kernels


class TimedGC:
    """Stands in for the `gc` module inside TRL's PPO trainer module (during `run` only): adds up the seconds of
    its collect() calls."""

    def __init__(self, real):
        self.real, self.seconds = real, 0.0

    def collect(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.real.collect(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.real, name)



class UpdateTimer(TrainerCallback):
    """Seconds of every loop iteration: the clock is read at `on_train_begin` and at every `on_step_end`; with a
    `gc_clock`, also the seconds of stock's gc.collect() calls within each iteration."""

    def __init__(self, device: str, bar=None, gc_clock=None):
        self.device, self.bar, self.gc_clock = device, bar, gc_clock
        self.marks: list[float] = []
        self.gc_marks: list[float] = []
        self.calls = {"on_step_begin": 0, "on_step_end": 0}

    def _gc_seconds(self) -> float:
        return self.gc_clock() if self.gc_clock else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.marks, self.gc_marks = [time.perf_counter()], [self._gc_seconds()]

    def on_step_begin(self, args, state, control, **kwargs):
        self.calls["on_step_begin"] += 1  # neither PPO loop calls it; counted to show that

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.marks.append(time.perf_counter())
        self.gc_marks.append(self._gc_seconds())
        self.calls["on_step_end"] += 1
        if self.bar is not None:
            self.bar.update(1)

    def intervals(self) -> list[float]:
        return list(np.diff(self.marks))

    def gc_intervals(self) -> list[float]:
        return list(np.diff(self.gc_marks))


# ------------------------------------------------------------------------------------------ trainers
def supported_kwargs(cls, **kwargs) -> dict:
    """The keyword arguments `cls.__init__` accepts (an older trainer, measured for "before", has fewer)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def ppo_config(args, preset: dict, workdir: str, device: str, name: str) -> PPOConfig:
    updates_per_call = args.warmup + args.updates
    return PPOConfig(
        output_dir=os.path.join(workdir, name), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch, total_episodes=updates_per_call * args.batch,
        num_ppo_epochs=args.ppo_epochs, num_mini_batches=1,
        # footprint: forward passes (and, in a trainer before generation_batch_size, generate) per micro-batch, as
        # the PPO stage sets it; compare: the whole batch at once
        local_rollout_forward_batch_size=args.micro_batch if args.mode == "footprint" else args.batch,
        response_length=preset["response_length"], temperature=preset["temperature"], stop_token="eos",
        kl_coef=PPO.kl_coef, cliprange=PPO.cliprange, cliprange_value=PPO.cliprange_value, vf_coef=PPO.vf_coef,
        gamma=PPO.gamma, lam=PPO.gae_lambda, whiten_rewards=False, missing_eos_penalty=None,
        num_sample_generations=0, learning_rate=args.lr or preset["lr"], lr_scheduler_type="constant",
        logging_steps=1, report_to=[], save_strategy="no", seed=0, bf16=False, fp16=False,
        use_cpu=device == "cpu", dataset_num_proc=None, dataloader_num_workers=0, disable_tqdm=True,
        activation_checkpointing=args.checkpointing,  # TRL's PPOConfig would default it on; stock ignores it
    )


def quiet(trainer):
    """No per-log printing or progress bar inside the timed loop (removed from both trainers alike)."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


def build(args, device: str, workdir: str, stock_gc: TimedGC):
    n_prompts = args.batch  # one batch of prompts: every update of both trainers rolls out the same prompt set
    if args.model == "tiny":
        tok, base, prompts, preset = tiny_setup(n_prompts)
    else:
        tok, base, prompts, preset = pythia_setup(args.model, n_prompts, args.prompt_len,
                                                  args.response_length or PYTHIA_RESPONSE_LENGTH)
    if args.response_length:
        preset["response_length"] = args.response_length
    dtype = DTYPES[args.dtype]
    base = base.to(dtype)
    value = value_model_like(base, tok).to(dtype)
    longest = max(len(x) for x in prompts) + preset["response_length"] + 8
    reward_model = tiny_reward_model(tok, longest).to(dtype)
    rm_dir = os.path.join(workdir, "reward_model")
    reward_model.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)

    data = datasets.Dataset.from_dict({"input_ids": prompts})
    eval_data = data.select(range(min(8, len(data))))
    per_trainer = args.repeats * (args.warmup + args.updates)
    bar = tqdm(total=(2 if args.mode == "compare" else 1) * per_trainer, desc="PPO updates", unit="update",
               mininterval=1.0)
    timers = {"stock": UpdateTimer(device, bar, gc_clock=lambda: stock_gc.seconds), "ours": UpdateTimer(device, bar)}
    common = dict(processing_class=tok, train_dataset=data, eval_dataset=eval_data)
    trainers = {}
    if args.mode == "compare":
        trainers["stock"] = PPOTrainer(args=ppo_config(args, preset, workdir, device, "stock"),
                                       model=copy.deepcopy(base), ref_model=copy.deepcopy(base),
                                       value_model=copy.deepcopy(value), reward_model=copy.deepcopy(reward_model),
                                       callbacks=[timers["stock"]], **common)
    else:
        del timers["stock"]
    algo = OmegaConf.create({"name": "ppo", "family": "ppo", "weighting": "ppo", "components": ["TOT"],
                             "lam": None, "t3": None, "tau": None})
    ablation = OmegaConf.create({"name": "none", "drop": [], "start_step": 0, "stop_step": None})
    reward = ClassifierReward(rm_dir, dtype=args.dtype, batch_size=args.batch, device=device)
    extra = supported_kwargs(ComponentPPOTrainer, generation_batch_size=args.generation_batch or None)
    trainers["ours"] = ComponentPPOTrainer(
        args=ppo_config(args, preset, workdir, device, "ours"), model=copy.deepcopy(base),
        ref_model=copy.deepcopy(base), value_model=copy.deepcopy(value), reward=reward, algo=algo, ablation=ablation,
        top_p=1.0, max_grad_norm=None, checkpoint_root=None, save_steps=0, callbacks=[timers["ours"]], **common,
        **extra)
    trainers = {name: quiet(t) for name, t in trainers.items()}
    for name, t in trainers.items():
        if t.accelerator.device.type != device:
            raise RuntimeError(f"{name} trainer runs on {t.accelerator.device}, asked for {device}")
    init = None if args.mode == "footprint" else {  # footprint: no extra copies in the measured process
        "policy": {k: v.detach().clone() for k, v in base.state_dict().items()},
        "value": {k: v.detach().clone() for k, v in value.state_dict().items()}}
    info = {"response_length": preset["response_length"], "temperature": preset["temperature"],
            "lr": args.lr or preset["lr"], "context_length": max(len(x) for x in prompts),
            "n_prompts": n_prompts}
    return trainers, timers, bar, init, info


def moved(trainer, init: dict) -> dict[str, float]:
    """Largest |parameter - init| of the trained policy and value model."""
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    out = {}
    for part, module in (("policy", wrapper.policy), ("value", wrapper.value_model)):
        state = module.state_dict()
        out[part] = max((state[k].float().cpu() - v.float()).abs().max().item() for k, v in init[part].items())
    return out


# ------------------------------------------------------------------------------------------ main
def bench(trainers, timers, bar, args, device: str):
    """Alternating blocks (AB, BA, ...): per-update times, per-block peak memory and train() wall time."""
    times, gc_times = {n: [] for n in trainers}, {n: [] for n in trainers}
    peaks, walls, per_repeat = {n: [] for n in trainers}, {n: [] for n in trainers}, []
    for r in range(args.repeats):
        block = {}
        names = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
        for name in names:
            bar.set_postfix(repeat=r, trainer=name)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            trainers[name].train()
            sync(device)
            walls[name].append(time.perf_counter() - start)
            peaks[name].append(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
            intervals = timers[name].intervals()
            if len(intervals) != args.warmup + args.updates:
                raise RuntimeError(f"{name}: {len(intervals)} updates timed, expected {args.warmup + args.updates}")
            block[name] = intervals[args.warmup:]
            times[name] += block[name]
            gc_times[name] += timers[name].gc_intervals()[args.warmup:]
        if "stock" in block:
            per_repeat.append(float(np.median(block["ours"]) / np.median(block["stock"])))
    bar.close()
    return times, gc_times, peaks, walls, per_repeat


# ------------------------------------------------------------------------------------------ footprint mode
def host_peak_kib() -> int:
    """The process's resident-set high-water mark (VmHWM), KiB."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def host_rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_host_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


class HostPeak(TrainerCallback):
    """Peak host memory of every update: the high-water mark is reset at `on_train_begin` and after every
    `on_step_end`; the resident set at the reset is the baseline (models, optimizer states, allocator caches)."""

    def __init__(self, device: str):
        self.device = device
        self.peaks, self.baselines, self.gpu_peaks, self.cpu_s = [], [], [], []

    def _reset(self):
        self._cpu_start = sum(os.times()[:2])  # user + system seconds: the work, however loaded the machine
        self.baselines.append(host_rss_kib())
        reset_host_peak()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def on_train_begin(self, args, state, control, **kwargs):
        self.peaks, self.baselines, self.gpu_peaks, self.cpu_s = [], [], [], []
        self._reset()

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu_s.append(sum(os.times()[:2]) - self._cpu_start)
        self.peaks.append(host_peak_kib())
        if self.device == "cuda":
            self.gpu_peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        self._reset()


def run_footprint(args) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    threads = set_threads(args.threads)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as workdir:
        trainers, timers, bar, init, info = build(args, device, workdir, TimedGC(stock_module.gc))
        ours = trainers["ours"]
        peak = HostPeak(device)
        ours.add_callback(peak)
        wrapper = ours.accelerator.unwrap_model(ours.model)
        checkpointing = any(getattr(m, "is_gradient_checkpointing", False)
                            for m in (wrapper.policy, wrapper.value_model))
        times, cpu, peaks, bases = [], [], [], []
        for _ in range(args.repeats if args.rollout_only else 0):
            torch.manual_seed(0)
            bases.append(host_rss_kib())
            reset_host_peak()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start, cpu_start = time.perf_counter(), sum(os.times()[:2])
            ours.make_rollout(ours.batch_for(1))
            sync(device)
            times.append(time.perf_counter() - start)
            cpu.append(sum(os.times()[:2]) - cpu_start)
            peaks.append(host_peak_kib())
            if device == "cuda":
                peak.gpu_peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        for _ in range(0 if args.rollout_only else args.repeats):
            ours.train()
            times += timers["ours"].intervals()[args.warmup:]
            cpu += peak.cpu_s[args.warmup:]
            peaks += peak.peaks[args.warmup:]
            bases += peak.baselines[args.warmup:len(peak.peaks)]  # the resident set at each update's start
        bar.close()
        del trainers, ours, wrapper
    gib = 1 / 2**20
    q1, med, q3 = quartiles(times)
    result = {"phase": "rollout" if args.rollout_only else "rollout+update",
              "median_s": med, "q1_s": q1, "q3_s": q3, "update_times_s": times,
              "cpu_median_s": float(np.median(cpu)), "update_cpu_s": cpu,
              "host_peak_gib": max(peaks) * gib, "host_baseline_gib": bases[peaks.index(max(peaks))] * gib,
              "host_transient_gib": max(p - b for p, b in zip(peaks, bases)) * gib,
              "gpu_peak_gib": max(peak.gpu_peaks) if peak.gpu_peaks else None,
              "checkpointing_enabled": checkpointing,
              "trainer_accepts": sorted(supported_kwargs(ComponentPPOTrainer, generation_batch_size=1,
                                                         pure_low_precision=False))}
    config = {**vars(args), "device": device, "threads": threads, **info,
              "gradient_accumulation_steps": args.batch // args.micro_batch, "trainer_file": inspect.getfile(
                  ComponentPPOTrainer)}
    return {"config": config, "footprint": result}


def print_footprint(res: dict) -> None:
    c, f = res["config"], res["footprint"]
    print(f"\nmodel={c['model']} device={c['device']} dtype={c['dtype']} threads={c['threads']} batch={c['batch']} "
          f"(micro {c['micro_batch']}) generation batch={c['generation_batch'] or c['batch']} "
          f"ppo_epochs={c['ppo_epochs']} context={c['context_length']} response={c['response_length']} "
          f"checkpointing={f['checkpointing_enabled']} trainer={c['trainer_file']}")
    print(f"{f['phase']}: median {f['median_s']:.1f} s (q1 {f['q1_s']:.1f}, q3 {f['q3_s']:.1f}, "
          f"n={len(f['update_times_s'])}), CPU time (user+sys) median {f['cpu_median_s']:.1f} s; "
          f"peak host RSS {f['host_peak_gib']:.3f} GiB = baseline "
          f"{f['host_baseline_gib']:.3f} + transient {f['host_transient_gib']:.3f} GiB"
          + (f"; peak GPU allocated {f['gpu_peak_gib']:.3f} GiB" if f["gpu_peak_gib"] is not None else ""))


def write_footprint(res: dict, path: str) -> None:
    f = res["footprint"]
    keys = ["median_s", "cpu_median_s", "host_peak_gib", "host_baseline_gib", "host_transient_gib", "gpu_peak_gib"]
    write_results(res, path, [*keys, "checkpointing"], [[*(f[k] for k in keys), f["checkpointing_enabled"]]])


def run(args) -> dict:
    if args.mode == "footprint":
        return run_footprint(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    threads = set_threads(args.threads)
    datasets.disable_progress_bars()
    stock_gc = TimedGC(stock_module.gc)
    stock_module.gc = stock_gc  # only TRL's PPO module sees the stand-in; ours never calls gc.collect
    try:
        with tempfile.TemporaryDirectory() as workdir:
            trainers, timers, bar, init, info = build(args, device, workdir, stock_gc)
            times, gc_times, peaks, walls, per_repeat = bench(trainers, timers, bar, args, device)
    finally:
        stock_module.gc = stock_gc.real
    stats = {}
    for name in trainers:
        q1, med, q3 = quartiles(times[name])
        stats[name] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3, "iqr_ms": 1e3 * (q3 - q1),
                       "n_updates": len(times[name]), "peak_mem_gib": max(peaks[name]) if device == "cuda" else None,
                       "update_times_ms": [1e3 * t for t in times[name]],
                       "train_call_s": walls[name], "moved_from_init": moved(trainers[name], init),
                       "on_step_begin_calls": timers[name].calls["on_step_begin"],
                       "gc_collect_median_ms": 1e3 * float(np.median(gc_times[name]))}
    ratio = stats["ours"]["median_ms"] / stats["stock"]["median_ms"]
    no_gc = [t - g for t, g in zip(times["stock"], gc_times["stock"])]
    q1, med, q3 = quartiles(no_gc)
    stock_no_gc = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3, "iqr_ms": 1e3 * (q3 - q1),
                   "n_updates": len(no_gc), "ratio": stats["ours"]["median_ms"] / (1e3 * med)}
    ours_log = trainers["ours"].state.log_history
    stock_log = trainers["stock"].state.log_history
    checks = {"ours_logged_ppo_policy": any("ppo/policy" in h for h in ours_log),
              "stock_logged_loss_policy_avg": any("loss/policy_avg" in h for h in stock_log),
              "both_trained": all(v > 0 for s in stats.values() for v in s["moved_from_init"].values())}
    config = {**vars(args), "device": device, "threads": threads, **info,
              "gradient_accumulation_steps": args.batch // args.micro_batch,
              "block_order": "alternating AB/BA per repeat", "timing": "on_step_end to on_step_end"}
    return {"config": config, "trainers": stats, "ratio": ratio, "per_repeat_ratio": per_repeat, "target": TARGET,
            "verdict": "PASS" if ratio <= TARGET else "ABOVE TARGET", "checks": checks,
            "stock_without_gc_collect": stock_no_gc}


def print_table(res: dict) -> None:
    if "footprint" in res:
        return print_footprint(res)
    c = res["config"]
    print(f"\nmodel={c['model']} device={c['device']} dtype={c['dtype']} threads={c['threads']} "
          f"batch={c['batch']} (micro {c['micro_batch']} x {c['gradient_accumulation_steps']}) "
          f"ppo_epochs={c['ppo_epochs']} context={c['context_length']} response={c['response_length']} "
          f"lr={c['lr']:g}, {c['repeats']} repeats x {c['updates']} timed updates (+{c['warmup']} warmup)")
    # on CUDA both trainers' models and optimizer states stay resident: compare the peaks, not their size
    print(f"{'trainer':<8} {'median ms':>10} {'q1 ms':>9} {'q3 ms':>9} {'IQR ms':>8} {'updates':>8} {'peak GiB':>9}")
    for name, s in res["trainers"].items():
        print(f"{name:<8} {s['median_ms']:>10.2f} {s['q1_ms']:>9.2f} {s['q3_ms']:>9.2f} {s['iqr_ms']:>8.2f} "
              f"{s['n_updates']:>8} {'-' if s['peak_mem_gib'] is None else format(s['peak_mem_gib'], '.3f'):>9}")
    g = res["stock_without_gc_collect"]
    print(f"{'stock-gc':<8} {g['median_ms']:>10.2f} {g['q1_ms']:>9.2f} {g['q3_ms']:>9.2f} {g['iqr_ms']:>8.2f} "
          f"{g['n_updates']:>8} {'-':>9}   (stock minus its own gc.collect() calls, "
          f"median {res['trainers']['stock']['gc_collect_median_ms']:.1f} ms/update)")
    print("per-repeat ratio (ours/stock): " + " ".join(f"{x:.3f}" for x in res["per_repeat_ratio"]))
    print(f"ratio of medians (ours/stock): {res['ratio']:.3f}  target <= {res['target']}  {res['verdict']}")
    print(f"ratio against stock without its gc.collect() calls: {g['ratio']:.3f} (diagnostic)")
    moved = "; ".join(f"{n}: policy {s['moved_from_init']['policy']:.2e}, value {s['moved_from_init']['value']:.2e}"
                      for n, s in res["trainers"].items())
    ch = res["checks"]
    print(f"trained (max |param - init|): {moved}  -> both trained: {ch['both_trained']}")
    print(f"ours logged ppo/policy: {ch['ours_logged_ppo_policy']}; "
          f"stock logged loss/policy_avg: {ch['stock_logged_loss_policy_avg']}")


def write_out(res: dict, path: str) -> None:
    if "footprint" in res:
        return write_footprint(res, path)
    rows = [[name, s["median_ms"], s["q1_ms"], s["q3_ms"], s["iqr_ms"], s["n_updates"], s["peak_mem_gib"],
             res["ratio"], ";".join(f"{x:.4f}" for x in res["per_repeat_ratio"]), res["verdict"]]
            for name, s in res["trainers"].items()]  # one row per trainer; the ratio repeated on each row
    write_results(res, path, ["trainer", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "n_updates", "peak_mem_gib",
                              "ratio", "per_repeat_ratio", "verdict"], rows)


def main(argv=None) -> int:
    return cli(run, parse_args, print_table, write_out, argv)


if __name__ == "__main__":
    sys.exit(main())
