"""Gradient alignment G (paper Eq. 3) for the DPO family, every component and layer group from one pass.

G(L; theta) = E_D'[-grad log pi(y'|x')]^T grad L(D; theta). With g' the D' gradient restricted to each layer group
(the columns of a P x 4 matrix M), and the per-sequence gradients S (n x P) of a mini-batch's completion
log-probs, every DPO component is a coefficient vector c over the mini-batch's sequences (Eq. 5-10: -w+ m+ on
y+, +w- m- on y-), so G_c(b) = c^T (S M) and ||grad L_c(b)||^2 = c^T (S S^T) c: all components and groups need
only s = S M (n x 3) and the Gram matrix K = S S^T (n x n) of each mini-batch, one pass per mini-batch (DESIGN 2c),
never one backward per component.

Three ways to the same per-sequence numbers (`analysis.method`, `auto` picks by size, `choose_method`):
  vmap   per-sequence gradients of `chunk` sequences at a time (chunk x P memory: small models);
  ghost  one backward of sum_i log pi(y_i) with hooks: s_i,k = g'_k . grad log pi(y_i) and the Gram matrix K
         from each layer's inputs and output gradients (`ghost.py`), never a whole per-sequence gradient
         (billion-parameter models, about the cost of one ordinary backward);
  jvp    s_i,k by forward-mode products, one layer group at a time, plus K from the ghost pass (a check).
g' is kept per parameter ({name: tensor}) and layer groups by name, so nothing P-sized is ever concatenated.

Several targets (`analysis.targets`: D' = `dprime`, the paper's, and others such as the training chosen
responses) share every pass: their g'_t are stacked per parameter (`TargetGradients`), s becomes n x T x 3, and
each component's G per target is c^T s_t; K does not depend on the target. The same per-sequence dots give each
example's share of every component's G (`MinibatchAlignment.examples`), so per-example attribution costs nothing
more and never holds a per-example gradient of the model.

Layer groups: the transformer blocks split into bottom / middle / top thirds by index; the input embeddings
count in `bottom`, the final norm and the output head in `top`, so the three groups partition the parameters
and add up to `all` exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
from torch.func import functional_call, grad, vmap

from ..objectives.pairwise import build_pair_terms, component_coefficients
from ..objectives.pairwise_losses import decompose
from ..objectives import BASE_COMPONENTS, components_of
from .tables import PAPER_TARGET

GROUPS = ("all", "bottom", "middle", "top")
LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_group(name: str, n_layers: int) -> int:
    """0/1/2 = bottom/middle/top third of the parameter called `name`."""
    m = LAYER.search(name)
    if m:
        return (3 * int(m.group(1))) // n_layers
    return 0 if "embed_in" in name or "embed_tokens" in name or "wte" in name else 2


def layer_groups(model) -> dict[str, int]:
    """{trainable parameter name: 0/1/2 = bottom/middle/top group} (names, not a P-sized index tensor)."""
    n_layers = model.config.num_hidden_layers
    return {name: layer_group(name, n_layers) for name, p in model.named_parameters() if p.requires_grad}


def flatten(vector: dict[str, torch.Tensor], group: int | None = None, groups: dict | None = None) -> torch.Tensor:
    """A per-parameter vector as one flat tensor in named_parameters order, optionally restricted to one layer
    group (zeros elsewhere). For small models and tests only: the analysis never builds it."""
    return torch.cat([(t if group is None or groups[n] == group else torch.zeros_like(t)).flatten()
                      for n, t in vector.items()])


def choose_method(method: str, n_params: int, vmap_max_params: float) -> str:
    """`analysis.method=auto`: vmap (fast, chunk x P memory) up to `vmap_max_params` parameters, else ghost."""
    if method != "auto":
        return method
    return "vmap" if n_params <= vmap_max_params else "ghost"


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


def _accumulate_nll_gradient(model, named, batches) -> tuple[int, float]:
    """sum over the batches' sequences of -grad log pi(y|x), left in the parameters' .grad (one gradient of memory);
    returns (number of sequences, sum of their log-likelihoods: the forward gives them for free)."""
    for _, p in named:
        p.grad = None
    count, total, device = 0, 0.0, named[0][1].device
    for ids, mask, comp in batches:
        lp = sequence_logps(model, ids.to(device), mask.to(device), comp.to(device))
        (-lp.sum()).backward()
        count, total = count + len(ids), total + lp.detach().double().sum().item()
    if count == 0:
        raise ValueError("a G target has no sequences (analysis.targets / analysis.n_target)")
    return count, total


def dprime_gradient(model, batches) -> dict[str, torch.Tensor]:
    """g' = E_D'[-grad log pi(y'|x')] (sequence log-likelihood, mean over D' sequences), per parameter. The
    model's own log pi, no sampling temperature (unlike PPO's loss, whose log-probs divide the logits by it).
    Accumulated in the parameters' .grad by autograd (one gradient of memory, no second copy), then taken."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    count, _ = _accumulate_nll_gradient(model, named, batches)
    out = {}
    for n, p in named:
        out[n] = (p.grad if p.grad is not None else torch.zeros_like(p)).div_(count)
        p.grad = None
    return out


@dataclass
class TargetGradients:
    """g'_t = E_t[-grad log pi(y|x)] of T targets, stacked per parameter ({name: [T, *shape]}: T gradients of
    memory, never one flat P-sized copy), and each target's mean sequence log-likelihood under the model (from the
    same forward: `target_logp`, whose change between checkpoints G predicts to first order)."""

    names: tuple[str, ...]
    grads: dict[str, torch.Tensor]
    logp: dict[str, float]

    def one(self, t: int) -> dict[str, torch.Tensor]:
        """Target t's g' per parameter (views)."""
        return {n: g[t] for n, g in self.grads.items()}


def as_targets(g) -> TargetGradients:
    """A plain {name: g'} is the one target D' (views, no copy); a TargetGradients stays as it is."""
    if isinstance(g, TargetGradients):
        return g
    return TargetGradients((PAPER_TARGET,), {n: t[None] for n, t in g.items()}, {})


def target_gradients(model, batches_by_target: dict[str, list]) -> TargetGradients:
    """g'_t and the mean log-likelihood of every target ({name: mini-batches of (ids, mask, completion mask)}), one
    backward per target mini-batch, written straight into the stacked tensors (no second copy of any g')."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = tuple(batches_by_target)
    out = {n: torch.zeros((len(names), *p.shape), dtype=p.dtype, device=p.device) for n, p in named}
    logp = {}
    for t, name in enumerate(names):
        count, total = _accumulate_nll_gradient(model, named, batches_by_target[name])
        for n, p in named:
            if p.grad is not None:
                out[n][t] = p.grad.div_(count)
            p.grad = None
        logp[name] = total / count
    return TargetGradients(names, out, logp)


@dataclass
class MinibatchAlignment:
    """Per mini-batch b: G[b, component, group] (against D', the first target) and ||grad L_component(b)||[b,
    component]; with several targets G_targets[b, target, component, group] (G = G_targets[:, 0]); where the
    method gives per-sequence dots, examples[i, target, component] = example i's share of its mini-batch's G (layer
    group all; the shares of a mini-batch add up to its G) and example_batch[i] its mini-batch."""

    components: tuple[str, ...]
    G: torch.Tensor  # n_batches x n_components x 4
    norms: torch.Tensor  # n_batches x n_components
    targets: tuple[str, ...] = (PAPER_TARGET,)
    G_targets: torch.Tensor | None = None  # n_batches x n_targets x n_components x 4
    examples: torch.Tensor | None = None  # n_examples x n_targets x n_components
    example_batch: torch.Tensor | None = None  # n_examples
    target_logp: dict | None = None  # {target: mean sequence log-likelihood under the model} (the stage sets it)
    sample: object = None  # PPO: the rollout analysed (the stage writes its responses' text)

    def __post_init__(self):
        if self.G_targets is None:
            self.G_targets = self.G[:, None]


DPO_COMPONENTS = BASE_COMPONENTS  # every pairwise objective's; its own terms (an NLL anchor) follow them


def dpo_coefficients(chosen, rejected, ref_chosen, ref_rejected, algo, step: int, *, chosen_completion=None,
                     rejected_completion=None, chosen_ids=None, lam: float | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per component of the objective (`components_of`), the coefficients on [grad log pi(y+_i); grad log pi(y-_i)]
    of its loss gradient, for the whole sample (thirds ranked over the sample, as the paper ranks over D). The
    completion masks (and y+'s token ids) give length-normalised and unpaired objectives what the trainer gives
    them (`build_pair_terms`). `lam`: a controller's lambda in force at this step (controller=g_balance runs), else
    the objective's own schedule."""
    terms = build_pair_terms(chosen, rejected, ref_chosen, ref_rejected, step=step, chosen_ids=chosen_ids,
                             chosen_completion=chosen_completion, rejected_completion=rejected_completion)
    terms.lam = lam
    return component_coefficients(decompose(terms, algo), components_of(algo))


def _sequence_stats(model, ids, mask, comp, g, groups):
    """For each sequence of one vmap call: its completion log-prob, g'_t,k . grad log pi (n x T x 3: every target
    t, k = bottom, middle, top) and the Gram matrix of the per-sequence gradients. Products are taken parameter by
    parameter in the model's dtype and summed in float64: no flat copy of the per-sequence gradients, and sums over
    billions of entries never accumulate in float32."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, ids1, mask1, comp1):
        lp = (token_logps(model, p, ids1[None], mask1[None])[0] * comp1[1:]).sum()
        return lp, lp.detach()

    g = as_targets(g).grads
    grads, lp = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0, 0))(params, ids, mask, comp)
    n_targets = len(next(iter(g.values())))
    dots = torch.zeros(len(ids), n_targets, 3, dtype=torch.float64, device=ids.device)
    gram = torch.zeros(len(ids), len(ids), dtype=torch.float64, device=ids.device)
    for name, v in grads.items():
        v = v.reshape(len(ids), -1)
        v = v.double()  # float64: c^T s and c^T K c cancel (ghost.py's _block_stats)
        dots[:, :, groups[name]] += v @ g[name].reshape(n_targets, -1).double().T  # every target at once
        gram += v @ v.T
    return lp.double(), dots, gram


def _ghost_sequence_stats(model, ids, mask, comp, g, groups, route: str = "auto"):
    """`_sequence_stats` from one backward with hooks (ghost.py): no per-sequence gradient of the model."""
    from .ghost import SequenceGradientStats

    return SequenceGradientStats(model, g, groups, route=route)(lambda: sequence_logps(model, ids, mask, comp),
                                                                len(ids))


def _jvp_sequence_stats(model, ids, mask, comp, g, groups):
    """`_sequence_stats` with s by forward-mode products (one layer group and target at a time), K from the ghost
    pass."""
    from .ghost import SequenceGradientStats

    lp, _, gram = SequenceGradientStats(model, None, groups)(lambda: sequence_logps(model, ids, mask, comp),
                                                             len(ids))
    dots = target_directional_derivatives(
        model, lambda p: (token_logps(model, p, ids, mask) * comp[:, 1:]).sum(1), as_targets(g), groups)
    return lp, dots.double().permute(2, 0, 1).contiguous(), gram  # [T, 3, n] -> [n, T, 3]


def dpo_alignment(model, pairs, ref_logps, dprime: dict[str, torch.Tensor], algo, step: int,
                  batch_size: int = 4, chunk: int = 32, progress=None, method: str = "vmap",
                  route: str = "auto", lam: float | None = None) -> MinibatchAlignment:
    """G for every DPO component, layer group and target on mini-batches of `batch_size` pairs, every component's
    gradient norm and each pair's share of every G: G_c(b) = c^T s_k and ||grad L_c(b)||^2 = c^T K c with s_i,k = g'_k . grad log pi(y_i) and K the
    Gram matrix of the per-sequence gradients, where the coefficients c (thirds of omega over the whole sample)
    are formed after the pass from its own log-probs. `method` (vmap | ghost | jvp) says how s and K are had;
    vmap takes `chunk` sequences per call, ghost and jvp one mini-batch; `route` is ghost.py's per-parameter
    choice (auto | ghost | materialise).

    `pairs`: dict of chosen_ids/chosen_mask/chosen_comp and rejected_* tensors (N rows each, right-padded);
    `ref_logps`: (N, N) reference sequence log-probs of chosen and rejected; `dprime`: {name: g'} (D' alone) or a
    `TargetGradients` (several targets, one pass for all).

    Attribution: pair i of mini-batch b contributes (c_i+ s_i+ + c_i- s_i-) (coefficients over the mini-batch's
    size, as in G_b) to G_b, so its pairs' shares add up to G_b exactly (`examples`, layer group all)."""
    targets = as_targets(dprime)
    device = next(iter(targets.grads.values())).device
    groups = layer_groups(model)
    stats = {"vmap": _sequence_stats, "jvp": _jvp_sequence_stats,
             "ghost": lambda *a: _ghost_sequence_stats(*a, route=route)}
    if method not in stats:
        raise ValueError(f"analysis.method must be vmap, ghost or jvp here, got {method!r}")
    pairs = {k: v.to(device) for k, v in pairs.items()}
    n = len(pairs["chosen_ids"])
    batches = [torch.arange(s, min(s + batch_size, n), device=device) for s in range(0, n, batch_size)]
    chunk = chunk if method == "vmap" else 2 * batch_size
    chunk = max(chunk - chunk % (2 * batch_size), 2 * batch_size)  # whole mini-batches per call
    order = torch.cat([torch.cat([idx, n + idx]) for idx in batches])  # [chosen; rejected] per mini-batch
    stacked = {k: torch.cat([pairs[f"chosen_{k}"], pairs[f"rejected_{k}"]])[order] for k in ("ids", "mask", "comp")}
    starts = range(0, len(order), chunk)
    logps, dots, grams = [], [], []
    for s in (progress(starts) if progress else starts):
        lp, d, gram = stats[method](model, stacked["ids"][s:s + chunk], stacked["mask"][s:s + chunk],
                                    stacked["comp"][s:s + chunk], targets, groups)
        logps.append(lp)
        dots.append(d)
        grams.append(gram)
    logps, dots = torch.cat(logps), torch.cat(dots)
    per_sequence = torch.empty_like(logps)
    per_sequence[order] = logps  # back to [chosen (N); rejected (N)]
    coef = dpo_coefficients(per_sequence[:n], per_sequence[n:], *(r.to(device).double() for r in ref_logps),
                            algo, step, chosen_completion=pairs["chosen_comp"][:, 1:],
                            rejected_completion=pairs["rejected_comp"][:, 1:], chosen_ids=pairs["chosen_ids"][:, 1:],
                            lam=lam)
    components = tuple(coef)
    G, norms, row = [], [], 0
    examples = torch.zeros(n, len(targets.names), len(components), dtype=torch.float64, device=device)
    example_batch = torch.zeros(n, dtype=torch.long, device=device)
    for b, idx in enumerate(batches):
        rows = slice(row, row + 2 * len(idx))
        gram_chunk, offset = grams[row // chunk], row % chunk
        gram = gram_chunk[offset:offset + 2 * len(idx), offset:offset + 2 * len(idx)]
        C = torch.stack([torch.cat([coef[c][idx], coef[c][n + idx]]) for c in components]).double() / len(idx)
        g3 = torch.einsum("ci,itk->tck", C, dots[rows])  # targets x components x 3
        G.append(torch.cat([g3.sum(-1, keepdim=True), g3], dim=-1))
        norms.append(torch.einsum("ci,ij,cj->c", C, gram, C).clamp(min=0).sqrt())
        per_row = torch.einsum("ci,it->itc", C, dots[rows].sum(-1))  # each sequence's term of G_b (group all)
        examples[idx] = per_row[:len(idx)] + per_row[len(idx):]  # a pair: its chosen and its rejected term
        example_batch[idx] = b
        row += 2 * len(idx)
    G = torch.stack(G)
    return MinibatchAlignment(components, G[:, 0], torch.stack(norms), targets.names, G, examples, example_batch)


def merge_targets(parts: list[MinibatchAlignment]) -> MinibatchAlignment:
    """Alignments of the same sample against different targets (one pass each) as one: targets side by side; norms,
    mini-batches and the sample from the first (they do not depend on the target)."""
    first = parts[0]
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts], 1)  # noqa: E731
    logp = {k: v for p in parts for k, v in (p.target_logp or {}).items()}
    G = cat("G_targets")
    return MinibatchAlignment(first.components, G[:, 0], first.norms, tuple(t for p in parts for t in p.targets), G,
                              cat("examples"), first.example_batch, logp or None, first.sample)


def iqr_outliers(norms: torch.Tensor) -> torch.Tensor:
    """Mini-batches whose gradient norm exceeds Q3 + 1.5 IQR (paper App. C.2)."""
    q1, q3 = torch.quantile(norms.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return norms.double() > q3 + 1.5 * (q3 - q1)


def summarise(mb: MinibatchAlignment) -> dict:
    """G over D: the mean of the mini-batch G's, over all mini-batches and over the non-outliers (outliers by the
    TOT gradient norm, the same batches excluded for every component and target so components stay additive).
    `*_targets`: the same per target [T, components, 4]; the first target's is G_filtered / G_unfiltered."""
    outliers = iqr_outliers(mb.norms[:, 0])
    kept = ~outliers
    return {"G_filtered": mb.G[kept].mean(0), "G_unfiltered": mb.G.mean(0), "outliers": outliers,
            "n_batches": len(outliers), "n_outliers": int(outliers.sum()),
            "G_filtered_targets": mb.G_targets[kept].mean(0), "G_unfiltered_targets": mb.G_targets.mean(0)}


# ============================================================================================== PPO

PPO_COMPONENTS = DPO_COMPONENTS


def ppo_token_coefficients(rollout, algo, step: int, weighting,
                           lam: float | None = None) -> dict[str, torch.Tensor]:
    """Per component of the objective (`components_of`), the coefficient of each response token's grad log pi in
    its policy-loss gradient at the rollout's own policy (ratio 1, inside the clip): -A_t * weight_t * mask_t, thirds
    ranked over the batch (by response where A is per response); a KL-in-the-loss term (GRPO) is its own component
    KL, kl_coef (1 - pi_ref / pi) per token, and part of TOT. The aggregation's normaliser
    (`aggregation_weights`, the trainer's) is applied per mini-batch in `ppo_alignment`. `lam`: a controller's
    lambda in force at this step (on the weighting's own tokens, as the trainer puts it), else the weighting's own."""
    from ..objectives.policy_gradient import (TOKEN_COMPONENTS, controlled_weights, kl_k3_coefficient, settings,
                                              thirds_of)

    adv, valid = rollout.advantages, rollout.valid
    thirds = thirds_of(adv, valid, algo)
    if lam is None:
        weights, _ = weighting(adv, thirds, step, algo)
    else:
        weights, _ = controlled_weights(adv, thirds, valid, algo.weighting, lam)
    out = {c: -(adv * weights * TOKEN_COMPONENTS[c](adv, thirds, valid).to(adv.dtype)) for c in PPO_COMPONENTS}
    a = settings(algo)
    if "KL" in components_of(algo):
        kl = a.kl_coef * kl_k3_coefficient(rollout.logprobs, rollout.ref_logprobs).to(adv.dtype)
        out["KL"] = kl.masked_fill(~valid, 0.0) if a.kl_in == "loss" else torch.zeros_like(adv)
        out["TOT"] = out["TOT"] + out["KL"]
    return out


def _response_logps(model, params, rollout, idx, temperature: float):
    """Log-probs of the response tokens, float64 for the dot products: logits / the sampling temperature, as the
    PPO loss computes them (TRL's convention), so G is that of the loss actually trained; D' has no temperature."""
    ids, mask = rollout.query_responses[idx], rollout.attention_mask[idx]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                              "use_cache": False})
    ctx = rollout.context_length
    logits = out.logits[:, ctx - 1:-1].to(torch.float64) / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, ctx:, None])[..., 0]


def _per_group_jvp(model, fn, tangent_of, groups: dict[str, int], over_targets: bool) -> list[torch.Tensor]:
    """For k = bottom, middle, top: the forward-mode product of fn(theta) with the group's tangents
    (`tangent_of(name)`: a view of g', or [T, *shape] stacked g' that `over_targets` vmaps). The group's parameters
    are the primals, the others constants: no zero tangents, no stacked copies, no backward graph. SDPA's fused
    kernels have no forward-mode formula: its math backend is forced (eager attention needs none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    out = []
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for k in range(3):
            primals = {n: v for n, v in params.items() if groups[n] == k}
            fixed = {n: v for n, v in params.items() if groups[n] != k}
            tangents = {n: tangent_of(n).to(v.dtype) for n, v in primals.items()}

            def along(tangent, primals=primals, fixed=fixed):
                return torch.func.jvp(lambda p: fn({**fixed, **p}), (primals,), (tangent,))[1]
            out.append(vmap(along, randomness="same")(tangents) if over_targets else along(tangents))
    return out


def group_directional_derivatives(model, fn, dprime: dict[str, torch.Tensor], groups: dict[str, int]) -> torch.Tensor:
    """[3, *fn's output]: d fn(theta) . g'_k for k = bottom, middle, top, by forward mode one layer group at a
    time (`_per_group_jvp`)."""
    return torch.stack(_per_group_jvp(model, fn, lambda n: dprime[n], groups, over_targets=False))


def target_directional_derivatives(model, fn, targets: TargetGradients, groups: dict[str, int],
                                   batched: bool = True) -> torch.Tensor:
    """[T, 3, *fn's output]: `group_directional_derivatives` for every target. `batched`: per layer group one
    forward-mode pass with the T targets' tangents vmapped (the primal forward is computed once, the tangent part
    for all targets together); else a loop over targets (3 passes each)."""
    if not batched or len(targets.names) == 1:
        return torch.stack([group_directional_derivatives(model, fn, targets.one(t), groups)
                            for t in range(len(targets.names))])
    return torch.stack(_per_group_jvp(model, fn, lambda n: targets.grads[n], groups, over_targets=True), dim=1)


def _weighted_gradient_stats(model, groups, dprime, logps_fn, weights: torch.Tensor):
    """(g'_t,k . grad sum_t w_t log pi_t [T, 3], ||grad sum_t w_t log pi_t||^2) from one ghost pass with the
    token weights folded into each sequence's scalar (rows = sequences: their sum is the weighted sum); `dprime`
    None: the norm only (dots are 0)."""
    from .ghost import SequenceGradientStats

    _, dots, gram = SequenceGradientStats(model, dprime, groups)(
        lambda: (weights * logps_fn(dict(model.named_parameters()))).sum(1), weights.shape[0])
    return dots.sum(0), gram.sum()


def trimmed_rows(rollout, idx):
    """Rows `idx` of a rollout without the columns that are padding in all of them (a sample of 500 responses is
    padded to its longest prompt and response; a mini-batch of 6 needs only its own), and the response width kept."""
    from ..trainers.ppo import Rollout

    ctx = rollout.context_length
    attended = rollout.attention_mask[idx, :ctx].any(0).nonzero()
    start = int(attended[0]) if len(attended) else ctx - 1
    width = max(int(rollout.valid[idx].sum(1).max()), 1)
    cut = {f: getattr(rollout, f)[idx] for f in ("query_responses", "attention_mask")}
    cut = {f: torch.cat([t[:, start:ctx], t[:, ctx:ctx + width]], 1) for f, t in cut.items()}
    rest = {f.name: getattr(rollout, f.name)[idx, :width] for f in fields(Rollout)
            if f.name not in ("query_responses", "attention_mask", "context_length", "scores")}
    return Rollout(context_length=ctx - start, scores=rollout.scores[idx], **cut, **rest), width


def ppo_alignment(model, rollout, dprime: dict[str, torch.Tensor], coefficients: dict, temperature: float = 1.0,
                  batch_size: int = 6, progress=None, all_norms: bool = False,
                  aggregation: str = "token_mean", max_len: int | None = None) -> MinibatchAlignment:
    """G for every PPO component, layer group and target on mini-batches of `batch_size` responses of a saved
    rollout, and each response's share of every G (`examples`: its tokens' terms, which add up to G_b).

    Components are token-weighted (POS/NEG split a sequence): forward-mode products, one layer group at a time,
    give g'_k . grad log pi(y_t) for every token, so every component's G from 3 passes; the TOT gradient norm comes
    from one ghost pass (ghost.py) with the TOT token weights folded into each sequence. `all_norms`: the other
    components' norms too, one ghost pass each (components with no weight in a mini-batch cost nothing).
    Forward-mode AD needs eager attention or SDPA's math backend; in float64, eager attention turns the fully
    masked rows of left padding into NaN, so run it in float32/bfloat16 (as the analysis stage does).
    `aggregation`: the objective's `algo.loss_aggregation`; each mini-batch is one batch of it (its normaliser
    from `aggregation_weights`, the trainer's function); `max_len`: Dr-GRPO's constant (model.ppo.max_new_tokens)."""
    from ..objectives.policy_gradient import aggregation_weights

    targets = as_targets(dprime)
    device = next(iter(targets.grads.values())).device
    components = tuple(coefficients)
    groups = layer_groups(model)
    rollout = rollout.to(device)
    coefficients = {k: v.to(device) for k, v in coefficients.items()}
    n, G, norms = rollout.valid.shape[0], [], []
    examples = torch.zeros(n, len(targets.names), len(components), dtype=torch.float64, device=device)
    example_batch = torch.zeros(n, dtype=torch.long, device=device)
    starts = range(0, n, batch_size)
    for b, s in enumerate(progress(starts) if progress else starts):
        idx = torch.arange(s, min(s + batch_size, n), device=device)
        rows, width = trimmed_rows(rollout, idx)
        valid = rows.valid
        norm = aggregation_weights(valid, aggregation, max_len=max_len or rollout.valid.shape[1]).double()
        C = torch.stack([coefficients[c][idx, :width] for c in components]).double() * norm

        def logps(p, rows=rows, valid=valid):
            return _response_logps(model, p, rows, slice(None), temperature).masked_fill(~valid, 0.0)

        dlp = target_directional_derivatives(model, logps, targets, groups).double()  # targets x 3 x b x tokens
        g3 = torch.einsum("cbt,xkbt->xck", C, dlp)
        G.append(torch.cat([g3.sum(-1, keepdim=True), g3], dim=-1))
        examples[idx] = torch.einsum("cbt,xkbt->bxc", C, dlp)  # each response's share (its tokens, all groups)
        example_batch[idx] = b
        sq = torch.full((len(components),), float("nan"), dtype=torch.float64, device=device)
        for c in range(len(components) if all_norms else 1):
            sq[c] = _weighted_gradient_stats(model, groups, None, logps, C[c])[1] if C[c].any() else 0.0
        norms.append(sq.clamp(min=0).sqrt())
    if not G:  # no response carries gradient (DAPO's dynamic sampling dropped every group): no mini-batch
        empty = torch.zeros(0, len(targets.names), len(components), 4, dtype=torch.float64)
        return MinibatchAlignment(components, empty[:, 0], torch.zeros(0, len(components), dtype=torch.float64),
                                  targets.names, empty, examples, example_batch)
    G = torch.stack(G)
    return MinibatchAlignment(components, G[:, 0], torch.stack(norms), targets.names, G, examples, example_batch)
