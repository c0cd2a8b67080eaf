"""vLLM generation in its own process: `python vllm_worker.py REQUEST.json RESPONSE.json` (or `python -m
po_experiments.generation.vllm_worker ...`).

It imports only the standard library and vllm, so it runs under any interpreter that has vllm (a separate venv
whose torch/transformers differ from the training stack's). The request names a saved model folder, the text
prompts (already chat-formatted, tokenized without added special tokens as HF generate does here) and the
sampling settings; the response holds one output per prompt, in the prompts' order.

Request: {"model": str, "prompts": [str], "max_new_tokens": int, "temperature": float (0: greedy),
          "seed": int, "min_new_tokens": int, "dtype": str, "gpu_memory_utilization": float,
          "tensor_parallel_size": int}
Response: {"outputs": [str], "seconds": float}
"""
from __future__ import annotations

import json
import os
import sys
import time

REQUIRED = ("model", "prompts", "max_new_tokens")


def read_request(path: str) -> dict:
    with open(path) as f:
        request = json.load(f)
    missing = [k for k in REQUIRED if k not in request]
    if missing:
        raise ValueError(f"{path}: the request lacks {missing}")
    return request


def sampling_params(request: dict):
    from vllm import SamplingParams

    temperature = float(request.get("temperature", 0.0))
    return SamplingParams(temperature=temperature, top_p=1.0, max_tokens=int(request["max_new_tokens"]),
                          min_tokens=int(request.get("min_new_tokens", 0)), seed=int(request.get("seed", 0)),
                          skip_special_tokens=True)


def generate(request: dict) -> list[str]:
    from vllm import LLM

    llm = LLM(model=request["model"], dtype=request.get("dtype", "auto"), seed=int(request.get("seed", 0)),
              gpu_memory_utilization=float(request.get("gpu_memory_utilization", 0.8)),
              tensor_parallel_size=int(request.get("tensor_parallel_size", 1)))
    tokenizer = llm.get_tokenizer()
    # token ids, not text: vLLM would add a BOS to text prompts, HF generate here does not (the template has it)
    prompts = [{"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)} for p in request["prompts"]]
    results = llm.generate(prompts, sampling_params(request), use_tqdm=False)
    if len(results) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(results)} outputs for {len(prompts)} prompts")
    return [r.outputs[0].text.strip() for r in results]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.time()
    outputs = generate(read_request(argv[0]))
    with open(argv[1] + ".tmp", "w") as f:
        json.dump({"outputs": outputs, "seconds": time.time() - start}, f)
    os.replace(argv[1] + ".tmp", argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
