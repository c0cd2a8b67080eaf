"""Gradient alignment G (paper Eq. 3) for the DPO family, every component and layer group from one pass.

G(L; theta) = E_D'[-grad log pi(y'|x')]^T grad L(D; theta). With g' the D' gradient restricted to each layer group
(the columns of a P x 4 matrix M), and the per-sequence gradients S (n x P) of a mini-batch's completion
log-probs, every DPO component is a coefficient vector c over the mini-batch's sequences (Eq. 5-10: -w+ m+ on
y+, +w- m- on y-), so G_c(b) = c^T (S M) and ||grad L_c(b)|| = ||c^T S||: all components and groups cost one
vmap'd per-sequence backward per mini-batch (DESIGN 2c), never one backward per component.

Layer groups: the transformer blocks split into bottom / middle / top thirds by index; the input embeddings
count in `bottom`, the final norm and the output head in `top`, so the three groups partition the parameters
and add up to `all` exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from ..trainers.objectives import ALGORITHMS, PairTerms, rank_thirds, union_masks

GROUPS = ("all", "bottom", "middle", "top")
LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_group(name: str, n_layers: int) -> int:
    """0/1/2 = bottom/middle/top third of the parameter called `name`."""
    m = LAYER.search(name)
    if m:
        return (3 * int(m.group(1))) // n_layers
    return 0 if "embed_in" in name or "embed_tokens" in name or "wte" in name else 2


def parameter_groups(model) -> torch.Tensor:
    """For the flattened trainable parameters: 0/1/2 = bottom/middle/top group of each entry."""
    n_layers = model.config.num_hidden_layers
    return torch.cat([torch.full((p.numel(),), layer_group(name, n_layers), dtype=torch.long)
                      for name, p in model.named_parameters() if p.requires_grad])


def group_matrix(g: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """P x 4: g restricted to all / bottom / middle / top."""
    cols = [g] + [torch.where(groups == k, g, torch.zeros_like(g)) for k in range(3)]
    return torch.stack(cols, dim=1)


def flat(grads) -> torch.Tensor:
    """Per-sequence gradient tensors (each chunk x param shape) -> chunk x P, in named_parameters order."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in grads], dim=1)


def prompt_completion_ids(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """Ids of prompt and completion (+ EOS) as DPO trains on them: plain text, or message lists through the chat
    template (the completion is what the full conversation adds after the prompt's generation prompt)."""
    if isinstance(prompt, str):
        return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
                tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    from ..models import chat_template_ids

    head = chat_template_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_template_ids(tokenizer, list(prompt) + list(completion))
    return head, full[len(head):]


def encode(tokenizer, prompts: list, completions: list) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and completion mask of prompt + completion (as DPO trains on them)."""
    rows = []
    for p, c in zip(prompts, completions):
        prompt, completion = prompt_completion_ids(tokenizer, p, c)
        rows.append((prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, c) in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)], comp[i, :len(row)] = torch.tensor(row), 1, torch.tensor(c)
    return ids, mask, comp


def encode_pairs(tokenizer, pairs) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* tensors of one common width (a mini-batch stacks both sides)."""
    prompts = list(pairs["prompt"])
    tensors = encode(tokenizer, prompts + prompts, list(pairs["chosen"]) + list(pairs["rejected"]))
    n = len(prompts)
    return {f"{side}_{name}": t[half] for t, name in zip(tensors, ("ids", "mask", "comp"))
            for side, half in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n)))}


def token_logps(model, params, input_ids, attention_mask):
    out = functional_call(model, params, (), {"input_ids": input_ids, "attention_mask": attention_mask,
                                              "use_cache": False})
    logp = torch.log_softmax(out.logits[:, :-1].to(torch.float32 if out.logits.dtype == torch.float16
                                                   else out.logits.dtype), -1)
    return logp.gather(-1, input_ids[:, 1:, None])[..., 0]


def sequence_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    params = dict(model.named_parameters())
    return (token_logps(model, params, input_ids, attention_mask) * completion_mask[:, 1:]).sum(1)


def per_sequence_grads(model, input_ids, attention_mask, completion_mask, chunk: int = 8) -> torch.Tensor:
    """n x P: gradient of each sequence's completion log-prob (vmap over sequences, `chunk` at a time)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, ids, mask, comp):
        return (token_logps(model, p, ids[None], mask[None])[0] * comp[1:]).sum()

    rows = []
    for s in range(0, len(input_ids), chunk):
        g = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, input_ids[s:s + chunk], attention_mask[s:s + chunk],
                                                    completion_mask[s:s + chunk])
        rows.append(flat(list(g.values())))
    return torch.cat(rows)


def dprime_gradient(model, batches) -> torch.Tensor:
    """g' = E_D'[-grad log pi(y'|x')] (sequence log-likelihood, mean over D' sequences), flattened."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    count = 0
    device = params[0].device
    for ids, mask, comp in batches:
        loss = -sequence_logps(model, ids.to(device), mask.to(device), comp.to(device)).sum()
        torch._foreach_add_(total, torch.autograd.grad(loss, params))
        count += len(ids)
    return torch.cat([t.flatten() for t in total]) / count


@dataclass
class MinibatchAlignment:
    """Per mini-batch b: G[b, component, group] and ||grad L_component(b)||[b, component]."""

    components: tuple[str, ...]
    G: torch.Tensor  # n_batches x n_components x 4
    norms: torch.Tensor  # n_batches x n_components


DPO_COMPONENTS = ("TOT", "POS", "NEG", "TOP", "MID", "BOT")


def dpo_coefficients(chosen, rejected, ref_chosen, ref_rejected, algo, step: int) -> dict[str, torch.Tensor]:
    """Per component, the coefficients on [grad log pi(y+_i); grad log pi(y-_i)] of its loss gradient, for the
    whole sample (thirds of omega are ranked over the sample, as the paper ranks over D)."""
    terms = PairTerms(chosen, rejected, ref_chosen, ref_rejected, step=step)
    d = ALGORITHMS[algo.name](terms, algo)
    thirds = rank_thirds(d.rank_by)
    coef = {}
    for comp in DPO_COMPONENTS:
        pos, neg = union_masks([comp], thirds)
        coef[comp] = torch.cat([-d.w_pos * pos, d.w_neg * neg])
    return coef


def parameter_spans(model, groups: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """name -> (start, end, group) of each trainable parameter in the flattened vector."""
    spans, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            spans[name] = (start, start + p.numel(), int(groups[start]))
            start += p.numel()
    return spans


def _sequence_stats(model, ids, mask, comp, g, spans):
    """For each sequence of one vmap call: its completion log-prob, g'_k . grad log pi (k = bottom, middle, top)
    and the Gram matrix of the per-sequence gradients. Products are taken parameter by parameter in the model's
    dtype and summed in float64: no flat copy of the per-sequence gradients, and sums over billions of entries
    never accumulate in float32."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, ids1, mask1, comp1):
        lp = (token_logps(model, p, ids1[None], mask1[None])[0] * comp1[1:]).sum()
        return lp, lp.detach()

    grads, lp = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0, 0))(params, ids, mask, comp)
    dots = torch.zeros(len(ids), 3, dtype=torch.float64, device=ids.device)
    gram = torch.zeros(len(ids), len(ids), dtype=torch.float64, device=ids.device)
    for name, v in grads.items():
        a, b, k = spans[name]
        v = v.reshape(len(ids), -1)
        dots[:, k] += (v @ g[a:b].to(v.dtype)).double()
        gram += (v @ v.T).double()
    return lp.double(), dots, gram


def dpo_alignment(model, pairs, ref_logps, dprime: torch.Tensor, groups: torch.Tensor, algo, step: int,
                  batch_size: int = 4, chunk: int = 32, progress=None) -> MinibatchAlignment:
    """G for every DPO component and layer group on mini-batches of `batch_size` pairs, from one vmap'd
    per-sequence backward per mini-batch: G_c(b) = c^T (S g'_k) and ||grad L_c(b)||^2 = c^T (S S^T) c, where the
    coefficients c (thirds of omega over the whole sample) are formed after the pass from its own log-probs.

    `pairs`: dict of chosen_ids/chosen_mask/chosen_comp and rejected_* tensors (N rows each, right-padded);
    `ref_logps`: (N, N) reference sequence log-probs of chosen and rejected."""
    device = dprime.device
    pairs = {k: v.to(device) for k, v in pairs.items()}
    n = len(pairs["chosen_ids"])
    batches = [torch.arange(s, min(s + batch_size, n), device=device) for s in range(0, n, batch_size)]
    chunk = max(chunk - chunk % (2 * batch_size), 2 * batch_size)  # whole mini-batches per vmap call
    order = torch.cat([torch.cat([idx, n + idx]) for idx in batches])  # [chosen; rejected] per mini-batch
    stacked = {k: torch.cat([pairs[f"chosen_{k}"], pairs[f"rejected_{k}"]])[order] for k in ("ids", "mask", "comp")}
    spans = parameter_spans(model, groups)
    starts = range(0, len(order), chunk)
    logps, dots, grams = [], [], []
    for s in (progress(starts) if progress else starts):
        lp, d, gram = _sequence_stats(model, stacked["ids"][s:s + chunk], stacked["mask"][s:s + chunk],
                                      stacked["comp"][s:s + chunk], dprime, spans)
        logps.append(lp)
        dots.append(d)
        grams.append(gram)
    logps, dots = torch.cat(logps), torch.cat(dots)
    per_sequence = torch.empty_like(logps)
    per_sequence[order] = logps  # back to [chosen (N); rejected (N)]
    coef = dpo_coefficients(per_sequence[:n], per_sequence[n:], *(r.to(device).double() for r in ref_logps),
                            algo, step)
    G, norms, row = [], [], 0
    for idx in batches:
        rows = slice(row, row + 2 * len(idx))
        gram_chunk, offset = grams[row // chunk], row % chunk
        gram = gram_chunk[offset:offset + 2 * len(idx), offset:offset + 2 * len(idx)]
        C = torch.stack([torch.cat([coef[c][idx], coef[c][n + idx]]) for c in DPO_COMPONENTS]).double() / len(idx)
        g3 = C @ dots[rows]  # components x 3
        G.append(torch.cat([g3.sum(1, keepdim=True), g3], dim=1))
        norms.append(torch.einsum("ci,ij,cj->c", C, gram, C).clamp(min=0).sqrt())
        row += 2 * len(idx)
    return MinibatchAlignment(DPO_COMPONENTS, torch.stack(G), torch.stack(norms))


def iqr_outliers(norms: torch.Tensor) -> torch.Tensor:
    """Mini-batches whose gradient norm exceeds Q3 + 1.5 IQR (paper App. C.2)."""
    q1, q3 = torch.quantile(norms.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return norms.double() > q3 + 1.5 * (q3 - q1)


def summarise(mb: MinibatchAlignment) -> dict:
    """G over D: the mean of the mini-batch G's, over all mini-batches and over the non-outliers (outliers by the
    TOT gradient norm, the same batches excluded for every component so components stay additive)."""
    outliers = iqr_outliers(mb.norms[:, 0])
    kept = ~outliers
    return {"G_filtered": mb.G[kept].mean(0), "G_unfiltered": mb.G.mean(0), "outliers": outliers,
            "n_batches": len(outliers), "n_outliers": int(outliers.sum())}


# ============================================================================================== PPO

PPO_COMPONENTS = DPO_COMPONENTS


def unflatten(vector: torch.Tensor, model) -> dict[str, torch.Tensor]:
    """A flat P-vector back to {parameter name: tensor}, in named_parameters order."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = vector[start:start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
    return out


def ppo_token_coefficients(rollout, algo, step: int, weighting) -> dict[str, torch.Tensor]:
    """Per component, the coefficient of each response token's grad log pi in its policy-loss gradient at the
    rollout's own policy (ratio 1, inside the clip): -A_t * weight_t * mask_t, thirds ranked over the batch.
    (Dividing by the mini-batch's number of valid tokens is done per mini-batch.)"""
    from ..trainers.ppo_objectives import TOKEN_COMPONENTS, token_thirds

    adv, valid = rollout.advantages, rollout.valid
    thirds = token_thirds(adv, valid)
    weights, _ = weighting(adv, thirds, step, algo)
    return {c: -(adv * weights * TOKEN_COMPONENTS[c](adv, thirds, valid).to(adv.dtype)) for c in PPO_COMPONENTS}


def _response_logps(model, params, rollout, idx, temperature: float):
    """Log-probs of the response tokens (temperature-scaled, as PPO trains), float64 for the dot products."""
    ids, mask = rollout.query_responses[idx], rollout.attention_mask[idx]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                              "use_cache": False})
    ctx = rollout.context_length
    logits = out.logits[:, ctx - 1:-1].to(torch.float64) / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, ctx:, None])[..., 0]


def group_tangents(g: torch.Tensor, groups: torch.Tensor, model) -> list[dict[str, torch.Tensor]]:
    """g' restricted to bottom / middle / top, as parameter dicts (the tangents of forward-mode passes)."""
    return [unflatten(torch.where(groups == k, g, torch.zeros_like(g)), model) for k in range(3)]


def forward_mode_minibatch(model, params, tangents, logps_fn, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One mini-batch by forward-mode AD: G[component, group] and the TOT gradient norm.

    `logps_fn(params)` -> per-token log-probs [b, T]; `C` [components, b, T] the token coefficients of each
    component's loss gradient (component 0 = TOT). A jvp per layer group (vmap'd over the three) gives
    g'_k . grad log pi for every token at once; one backward gives ||grad L_TOT||. No per-example gradient is ever
    materialised."""
    stacked = {k: torch.stack([t[k] for t in tangents]) for k in tangents[0]}  # the 3 groups in one vmap'd jvp
    dlp = vmap(lambda t: torch.func.jvp(logps_fn, (params,), (t,))[1])(stacked)  # 3 x b x T
    g = torch.einsum("cbt,kbt->ck", C, dlp.double())  # components x 3
    live = [v for v in model.parameters() if v.requires_grad]
    grads = torch.autograd.grad((C[0] * logps_fn(dict(model.named_parameters()))).sum(), live)
    norm = torch.linalg.vector_norm(torch.cat([x.flatten() for x in grads]).double())
    return torch.cat([g.sum(1, keepdim=True), g], dim=1), norm


def _tot_only_norms(norm: torch.Tensor, n_components: int) -> torch.Tensor:
    return torch.cat([norm[None], torch.full((n_components - 1,), float("nan"), dtype=torch.float64,
                                             device=norm.device)])


def dpo_alignment_jvp(model, pairs, ref_logps, dprime: torch.Tensor, groups: torch.Tensor, algo, step: int,
                      batch_size: int = 4, progress=None) -> MinibatchAlignment:
    """`dpo_alignment` by forward-mode AD (3 jvps + 1 backward per mini-batch): memory of one gradient, for
    billion-parameter models; per-component norms other than TOT are not computed."""
    device = dprime.device
    pairs = {k: v.to(device) for k, v in pairs.items()}
    with torch.no_grad():
        lp = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
              for s in ("chosen", "rejected")]
    coef = dpo_coefficients(*lp, *(r.to(device) for r in ref_logps), algo, step)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    tangents = group_tangents(dprime, groups, model)
    n, G, norms = len(lp[0]), [], []
    starts = range(0, n, batch_size)
    for s in (progress(starts) if progress else starts):
        idx = torch.arange(s, min(s + batch_size, n), device=device)
        ids = torch.cat([pairs["chosen_ids"][idx], pairs["rejected_ids"][idx]])
        mask = torch.cat([pairs["chosen_mask"][idx], pairs["rejected_mask"][idx]])
        comp = torch.cat([pairs["chosen_comp"][idx], pairs["rejected_comp"][idx]])[:, 1:].double()
        seq = torch.stack([torch.cat([coef[c][idx], coef[c][n + idx]]) for c in DPO_COMPONENTS]) / len(idx)
        C = seq.double()[:, :, None] * comp[None]
        row, norm = forward_mode_minibatch(model, params, tangents, lambda p: token_logps(model, p, ids, mask), C)
        G.append(row)
        norms.append(_tot_only_norms(norm, len(DPO_COMPONENTS)))
    return MinibatchAlignment(DPO_COMPONENTS, torch.stack(G), torch.stack(norms))


def ppo_alignment(model, rollout, dprime: torch.Tensor, groups: torch.Tensor, coefficients: dict,
                  temperature: float = 1.0, batch_size: int = 6, progress=None) -> MinibatchAlignment:
    """G for every PPO component and layer group on mini-batches of `batch_size` responses of a saved rollout.

    Components are token-weighted (POS/NEG split a sequence), so this uses forward mode: one jvp per layer group
    gives g'_k . grad log pi(y_t) for every token, plus one backward for the TOT norm.
    Forward-mode AD needs eager attention on CPU (SDPA has none); in float64, eager attention turns the fully
    masked rows of left padding into NaN, so run it in float32/bfloat16 (as the analysis stage does)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    rollout = rollout.to(dprime.device)
    coefficients = {k: v.to(dprime.device) for k, v in coefficients.items()}
    tangents = group_tangents(dprime, groups, model)
    n, G, norms = rollout.valid.shape[0], [], []
    starts = range(0, n, batch_size)
    for s in (progress(starts) if progress else starts):
        idx = torch.arange(s, min(s + batch_size, n), device=dprime.device)
        valid = rollout.valid[idx]
        C = torch.stack([coefficients[c][idx] for c in PPO_COMPONENTS]).double() / valid.sum().clamp(min=1)

        def logps(p, idx=idx, valid=valid):
            return _response_logps(model, p, rollout, idx, temperature).masked_fill(~valid, 0.0)

        row, norm = forward_mode_minibatch(model, params, tangents, logps, C)
        G.append(row)
        norms.append(_tot_only_norms(norm, len(PPO_COMPONENTS)))
    return MinibatchAlignment(PPO_COMPONENTS, torch.stack(G), torch.stack(norms))
