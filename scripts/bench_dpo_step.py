"""Time full DPO training steps of our ComponentDPOTrainer against stock TRL DPOTrainer, side by side.

One step = `trainer.training_step` (forward, `_compute_loss`, backward) + grad clipping + optimizer and scheduler
step + zero_grad, as the Trainer's loop does it. Fairness: both trainers start from deep copies of one model,
see the same prepared batches in the same order, use precomputed reference log-probs (so no reference forward is
timed for either), have dropout off, and run in alternating blocks (AB, BA, AB, ...) so load drift and
first-in-block effects hit both equally.

    python scripts/bench_dpo_step.py --model tiny --batch 64 --steps 30 --repeats 5 --threads 1
    python scripts/bench_dpo_step.py --model pythia-1b --batch 4 --seq-len 512 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import copy
import os
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
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere
from po_experiments.bench import cli, quartiles, write_results  # noqa: E402
from po_experiments.data.synthetic import DictionaryTask  # noqa: E402
from po_experiments.models import DTYPES, build_tiny_model, build_word_tokenizer, set_threads  # noqa: E402
from po_experiments.trainers.dpo import ComponentDPOTrainer  # noqa: E402
from po_experiments.objectives import BASE_COMPONENTS as COMPONENTS  # noqa: E402

TARGET = 1.05
MAX_DISTINCT_BATCHES = 16  # cycled: bounds tokenisation and the reference precompute for the big presets
PYTHIA = {  # randomly initialised GPTNeoX of Pythia sizes: timing needs the shapes, not the weights
    "pythia-160m": (768, 12, 12, 3072), "pythia-410m": (1024, 24, 16, 4096),
    "pythia-1b": (2048, 16, 8, 8192), "pythia-2.8b": (2560, 32, 32, 10240),
}
PYTHIA_VOCAB = 50304


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", *PYTHIA])
    p.add_argument("--batch", type=int, default=64, help="pairs per step (the model sees 2x rows)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row for the pythia presets (tiny: task)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per trainer per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every block")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--components", default="TOT", help="comma-separated union for ours, e.g. POS,NEG or POS")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (no autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = free cores")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--out", default=None, help="results file: .json or .csv")
    args = p.parse_args(argv)
    args.components = [c.strip().upper() for c in args.components.split(",") if c.strip()]
    if not args.components or set(args.components) - set(COMPONENTS):
        p.error(f"--components: pick from {sorted(COMPONENTS)}")  # fail before minutes of setup, not at step 1
    return args


# ------------------------------------------------------------------------------------------ model and data
def tiny_setup(n_pairs: int):
    """The embedded task's tokenizer, model and pairs (two demonstrations, ordered by gold reward)."""
    task = DictionaryTask.from_config()  # the task with its configured defaults
    tok = build_word_tokenizer(task.words)
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml").model
    model = build_tiny_model(model_cfg.arch, tok, seed=0)
    return tok, model, task.ranked_demonstration_pairs(n_pairs, seed=0), int(model_cfg.max_length)


def pythia_setup(name: str, n_pairs: int, seq_len: int):
    """Random-word pairs whose rows are exactly `seq_len` tokens, and a random Pythia-shaped model."""
    tok = build_word_tokenizer([f"w{i}" for i in range(PYTHIA_VOCAB - 5)])  # 5 specials: vocab = 50304
    hidden, layers, heads, inter = PYTHIA[name]
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=inter, rotary_pct=0.25,
                           max_position_embeddings=max(2048, seq_len), tie_word_embeddings=False,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(0, len(tok) - 5, size=n))  # noqa: E731
    n_prompt = seq_len // 2
    n_completion = seq_len - n_prompt - 3  # + <user>, <assistant>, <eos>
    rows = {"prompt": [f"<user> {words(n_prompt)} <assistant>" for _ in range(n_pairs)],
            "chosen": [" " + words(n_completion) for _ in range(n_pairs)],
            "rejected": [" " + words(n_completion) for _ in range(n_pairs)]}
    return tok, model, datasets.Dataset.from_dict(rows), seq_len


def make_trainer(cls, model, tok, pairs, args, max_length: int, workdir: str, device: str, **extra):
    config = DPOConfig(output_dir=os.path.join(workdir, cls.__name__), per_device_train_batch_size=args.batch,
                       max_length=max_length, precompute_ref_log_probs=True, beta=0.1, learning_rate=args.lr,
                       max_grad_norm=1.0, disable_dropout=True, report_to=[], save_strategy="no", seed=0,
                       bf16=False, fp16=False, use_cpu=device == "cpu", dataset_num_proc=None,
                       dataloader_num_workers=0)
    return cls(model=model, args=config, train_dataset=pairs, processing_class=tok, **extra)


def prepare_for_steps(trainer, total_steps: int):
    """What `Trainer.train` does before its loop: optimizer, accelerate wrapping, scheduler."""
    trainer.create_optimizer()
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.create_scheduler(num_training_steps=total_steps, optimizer=trainer.optimizer)
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1  # set per step by the Trainer loop; no accumulation here
    model.zero_grad()
    return model


def fixed_batches(trainer, n: int) -> list[dict]:
    """Collated, device-placed batches, built once and fed to both trainers: identical inputs by construction."""
    out = []
    for batch in trainer.get_train_dataloader():
        out.append(trainer._prepare_inputs(batch))
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA is asynchronous: the clock must wait for the kernels


def train_step(trainer, model, batch) -> None:
    """One optimizer step exactly as `Trainer._inner_training_loop` does it with no gradient accumulation."""
    trainer.training_step(model, batch)
    trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    trainer.state.global_step += 1


def time_block(trainer, model, batches, warmup: int, steps: int, device: str, bar):
    """Per-step seconds for `steps` timed steps after `warmup` untimed ones; and the block's peak memory (GiB)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        sync(device)
        start = time.perf_counter()
        train_step(trainer, model, batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        bar.update(1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return times, peak


# ------------------------------------------------------------------------------------------ main
def build_trainers(args, device: str, workdir: str):
    n_batches = min(args.warmup + args.steps, MAX_DISTINCT_BATCHES)
    if args.model == "tiny":
        tok, base, pairs, max_length = tiny_setup(n_batches * args.batch)
    else:
        tok, base, pairs, max_length = pythia_setup(args.model, n_batches * args.batch, args.seq_len)
    base = base.to(DTYPES[args.dtype])
    algo = OmegaConf.create({"name": "dpo", "beta": 0.1, "components": args.components})
    ablation = OmegaConf.create({"name": "none", "drop": [], "start_step": 0, "stop_step": None})
    trainers = {  # deep copies of one init; each precomputes the (identical) reference log-probs from it
        "stock": make_trainer(DPOTrainer, copy.deepcopy(base), tok, pairs, args, max_length, workdir, device),
        "ours": make_trainer(ComponentDPOTrainer, copy.deepcopy(base), tok, pairs, args, max_length, workdir,
                             device, algo=algo, ablation=ablation),
    }
    info = {"max_length": max_length, "n_batches": n_batches}
    return trainers, info


def bench(trainers, args, device: str, n_batches: int) -> tuple[dict, dict, list, dict]:
    """Alternating blocks (AB, BA, ...): per-step times, per-block peak memory, per-repeat ratios, the models."""
    total = args.repeats * (args.warmup + args.steps)
    models = {name: prepare_for_steps(t, total) for name, t in trainers.items()}
    batches = fixed_batches(trainers["stock"], n_batches)
    times, peaks, per_repeat = {n: [] for n in trainers}, {n: [] for n in trainers}, []
    with tqdm(total=2 * total, desc="train steps", unit="step", mininterval=1.0) as bar:
        for r in range(args.repeats):
            block = {}
            for name in (["stock", "ours"] if r % 2 == 0 else ["ours", "stock"]):
                bar.set_postfix(repeat=r, trainer=name)
                block[name], peak = time_block(trainers[name], models[name], batches, args.warmup, args.steps,
                                               device, bar)
                times[name] += block[name]
                peaks[name].append(peak)
            per_repeat.append(float(np.median(block["ours"]) / np.median(block["stock"])))
    return times, peaks, per_repeat, models


def run(args) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    threads = set_threads(args.threads)
    datasets.disable_progress_bars()  # keep the console to our own progress bar and table
    with tempfile.TemporaryDirectory() as workdir:
        trainers, info = build_trainers(args, device, workdir)
        times, peaks, per_repeat, models = bench(trainers, args, device, info["n_batches"])
    # our override ran iff its own metrics were logged; stock's `_compute_loss` logs entropy, ours does not
    exercised = "omega/mean" in trainers["ours"]._metrics["train"] and "entropy" in trainers["stock"]._metrics["train"]
    with torch.no_grad():  # same init + same batches + TOT gradient => the two models should stay (nearly) equal
        drift = max((a.float() - b.float()).abs().max().item()
                    for a, b in zip(models["ours"].parameters(), models["stock"].parameters()))
    stats = {}
    for name in trainers:
        q1, med, q3 = quartiles(times[name])
        stats[name] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3, "iqr_ms": 1e3 * (q3 - q1),
                       "n_steps": len(times[name]), "peak_mem_gib": max(peaks[name]) if device == "cuda" else None,
                       "step_times_ms": [1e3 * t for t in times[name]]}
    ratio = stats["ours"]["median_ms"] / stats["stock"]["median_ms"]
    config = {**vars(args), "device": device, "threads": threads,
              "reference": "precompute_ref_log_probs=True (both)", "max_length": info["max_length"],
              "distinct_batches": info["n_batches"], "block_order": "alternating AB/BA per repeat"}
    return {"config": config, "trainers": stats, "ratio": ratio, "per_repeat_ratio": per_repeat, "target": TARGET,
            "verdict": "PASS" if ratio <= TARGET else "ABOVE TARGET",
            "compute_loss_exercised": exercised, "max_param_diff": drift}


def print_table(res: dict) -> None:
    c = res["config"]
    print(f"\nmodel={c['model']} device={c['device']} dtype={c['dtype']} threads={c['threads']} batch={c['batch']} "
          f"pairs, components={','.join(c['components'])}, {c['repeats']} repeats x {c['steps']} timed steps "
          f"(+{c['warmup']} warmup), rows <= {c['max_length']} tokens, reference: {c['reference']}")
    # on CUDA both trainers' weights and optimizer states stay resident: compare the peaks, not their size
    print(f"{'trainer':<8} {'median ms':>10} {'q1 ms':>9} {'q3 ms':>9} {'IQR ms':>8} {'steps':>6} {'peak GiB':>9}")
    for name, s in res["trainers"].items():
        print(f"{name:<8} {s['median_ms']:>10.2f} {s['q1_ms']:>9.2f} {s['q3_ms']:>9.2f} {s['iqr_ms']:>8.2f} "
              f"{s['n_steps']:>6} {'-' if s['peak_mem_gib'] is None else format(s['peak_mem_gib'], '.3f'):>9}")
    print("per-repeat ratio (ours/stock): " + " ".join(f"{x:.3f}" for x in res["per_repeat_ratio"]))
    print(f"ratio of medians (ours/stock): {res['ratio']:.3f}  target <= {res['target']}  {res['verdict']}")
    print(f"_compute_loss of both classes exercised: {res['compute_loss_exercised']}; "
          f"max |param ours - stock| after training: {res['max_param_diff']:.2e} "
          "(~0 when ours' gradient is DPO's, e.g. TOT or POS,NEG: same batches, same updates)")


def write_out(res: dict, path: str) -> None:
    rows = [[name, s["median_ms"], s["q1_ms"], s["q3_ms"], s["iqr_ms"], s["n_steps"], s["peak_mem_gib"],
             res["ratio"], ";".join(f"{x:.4f}" for x in res["per_repeat_ratio"]), res["verdict"]]
            for name, s in res["trainers"].items()]  # one row per trainer; the ratio repeated on each row
    write_results(res, path, ["trainer", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "n_steps", "peak_mem_gib",
                              "ratio", "per_repeat_ratio", "verdict"], rows)


def main(argv=None) -> int:
    return cli(run, parse_args, print_table, write_out, argv)


if __name__ == "__main__":
    sys.exit(main())
