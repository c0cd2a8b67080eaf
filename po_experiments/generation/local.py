"""Greedy or sampled generation with transformers, in batches: the local backend behind generation.backend (and
what the synthetic task's pair sampling, the local judge and the benchmarks call directly)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             temperature: float = 0.0, seed: int = 0, desc: str = "generating", min_new_tokens: int = 0) -> list[str]:
    """Completions for text prompts, in order: greedy when temperature == 0, else ancestral sampling
    (`min_new_tokens`: benchmarks force full-length outputs)."""
    model.eval()
    tokenizer.padding_side = "left"
    sampling = temperature > 0
    if sampling:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        batch = prompts[start:start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        extra = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sampling else dict(do_sample=False)
        if min_new_tokens:
            extra["min_new_tokens"] = min_new_tokens
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **extra)
        outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in outputs]
