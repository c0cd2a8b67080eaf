"""Check the planner's memory model (po_experiments/plan.py) against measured peaks on this machine.

For each size (the tiny model, Pythia-160M and Pythia-410M shapes with random weights) a fresh process builds the
model and runs training steps as the SFT stage does (forward with labels, backward, AdamW step) at a real sequence
length, and reports its peak resident memory above the process's baseline next to the plan's estimate for the
same shape, batch and precision (float32 on CPU).

    python scripts/measure_memory.py                      # all three sizes, 1024 tokens (the paper's max_length)
    python scripts/measure_memory.py --sizes tiny --tokens 32 --out memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # GPTNeoX (Pythia) shapes: hidden, layers, heads, intermediate, vocab
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512, vocab_size=48),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=50304),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=50304),
    "pythia-2.8b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240,
                        vocab_size=50304),  # for the GPU check (scripts/gpu_check.sh)
}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def measure(size: str, tokens: int, batch: int, steps: int, device: str = "cpu", dtype: str = "float32",
            checkpointing: bool = False) -> dict:
    """One size in this process: the peak above the baseline taken after imports (call in a fresh process). On
    CUDA the peak is torch.cuda.max_memory_allocated; `dtype=bfloat16` trains as the stages do (float32 master
    weights and AdamW states, bf16 autocast)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from po_experiments.plan import Precision, Shape, activation_bytes, training_state_bytes

    torch.set_num_threads(max(1, torch.get_num_threads()))
    shape = SIZES[size]
    warm = torch.nn.Linear(8, 8)  # torch's lazy start-up (autograd engine, thread pools) belongs to the baseline
    torch.optim.AdamW(warm.parameters()).step(), warm(torch.ones(2, 8)).sum().backward()
    baseline = current_rss_bytes()
    config = GPTNeoXConfig(**shape, max_position_embeddings=max(2048, tokens), tie_word_embeddings=False,
                           attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(device).train()
    if checkpointing:  # as the stages do for real models (model.activation_checkpointing)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, shape["vocab_size"], (batch, tokens), device=device)
    mixed = dtype != "float32"
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device, dtype=getattr(torch, dtype), enabled=mixed):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    measured = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes() - baseline
    plan_shape = Shape(**shape)
    prec = Precision(4, 2 if mixed else 4, mixed)
    estimate = training_state_bytes(plan_shape.n_params, prec, 0, 1) + activation_bytes(plan_shape, prec,
                                                                                        batch * tokens, checkpointing)
    return {"size": size, "device": device, "dtype": dtype, "checkpointing": checkpointing, "params": sum(p.numel() for p in model.parameters()), "plan_params": plan_shape.n_params,
            "tokens": tokens, "batch": batch, "measured_gb": measured / 2**30, "plan_gb": estimate / 2**30,
            "error": estimate / measured - 1, "step_s": seconds}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "pythia-160m", "pythia-410m"], choices=list(SIZES))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: autocast over float32 master weights, as the training stages")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (real models' default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the per-size child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.sizes[0], args.tokens, args.batch, args.steps, args.device, args.dtype,
                                 args.checkpointing)))
        return []
    results = []
    for size in args.sizes:
        # the tiny model at its own run's shape (conf/model/tiny.yaml: 64 sequences of up to 32 tokens)
        tokens, batch = (min(args.tokens, 32), 64) if size == "tiny" else (args.tokens, args.batch)
        out = subprocess.run([sys.executable, __file__, "--one", "--sizes", size, "--tokens", str(tokens),
                              "--batch", str(batch), "--steps", str(args.steps),
                              "--device", args.device, "--dtype", args.dtype,
                              *(["--checkpointing"] if args.checkpointing else [])],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{r['size']:<12} {r['params'] / 1e6:8.1f}M params  {r['batch']} x {r['tokens']} tokens"
              f"{' (checkpointing)' if r['checkpointing'] else ''}  measured "
              f"{r['measured_gb']:6.2f} GB  plan {r['plan_gb']:6.2f} GB  error {r['error']:+.0%}  "
              f"({r['step_s']:.1f} s/step)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
