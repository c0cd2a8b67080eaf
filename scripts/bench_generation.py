"""Time the win-rate stage's generation: N prompts x M new tokens with HF generate (batched, the stage's code path)
and, where vLLM is installed, with vLLM on the same saved checkpoint. Random weights of a Pythia shape.

    python scripts/bench_generation.py --model pythia-2.8b --prompts 805 --new-tokens 512 --batch 128   # one GPU
    python scripts/bench_generation.py --model tiny --prompts 8 --new-tokens 8 --batch 4                # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"tiny": (64, 2, 4, 256), "pythia-160m": (768, 12, 12, 3072), "pythia-1b": (2048, 16, 8, 8192),
          "pythia-2.8b": (2560, 32, 32, 10240)}


def random_checkpoint(model: str, folder: Path, vocab: int = 50304) -> Path:
    """A GPTNeoX of the given shape with random weights and a byte-level tokenizer built offline, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, inter = SHAPES[model]
    core = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="w1", eos_token="w2", unk_token="w0")
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter, vocab_size=vocab, eos_token_id=2, pad_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, vocab, (length,), generator=g)) for _ in range(n)]


def hf(folder: Path, texts: list[str], new_tokens: int, batch: int) -> dict:
    from po_experiments.models import load_for_inference
    from po_experiments.stages.common import generate

    model, tok = load_for_inference(folder, "bfloat16")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    generate(model, tok, texts, max_new_tokens=new_tokens, batch_size=batch, min_new_tokens=new_tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del model
    return {"seconds": seconds, "tokens_per_s": len(texts) * new_tokens / seconds, "peak_gpu_gb": peak}


def vllm(folder: Path, texts: list[str], new_tokens: int) -> dict | None:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return None
    started = time.perf_counter()
    llm = LLM(model=str(folder), dtype="bfloat16", gpu_memory_utilization=0.5)
    loaded = time.perf_counter()
    llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens))
    done = time.perf_counter()
    return {"seconds": done - loaded, "engine_start_s": loaded - started,
            "tokens_per_s": len(texts) * new_tokens / (done - loaded)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=list(SHAPES))
    p.add_argument("--prompts", type=int, default=805, help="AlpacaEval has 805 instructions")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=512, help="the AlpacaEval protocol's 512")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    vocab = 50304 if args.model != "tiny" else 512
    texts = prompts(args.prompts, args.prompt_len, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(args.model, Path(tmp), vocab=vocab)
        result = {"model": args.model, "prompts": args.prompts, "new_tokens": args.new_tokens, "batch": args.batch,
                  "hf": hf(folder, texts, args.new_tokens, args.batch),
                  "vllm": None if args.no_vllm else vllm(folder, texts, args.new_tokens)}
    if result["vllm"]:
        result["vllm_speedup"] = result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
