"""Per-sequence gradient statistics without per-sequence gradients of the whole model ("ghost" method).

For rows i = 1..n of a batch whose scalars v_i (a sequence's completion log-prob) each depend on their own row
only, one backward of sum_i v_i gives, at every layer, the output gradient g_t of each token t, and a token's
g_t depends on its own row alone. A linear layer's per-row weight gradient is then sum_{t in i} g_t a_t^T
(a = the layer's input), so, layer by layer during that one backward:

  K_ij   = grad v_i . grad v_j     (the Gram matrix of the per-row gradients: every component's gradient norm is
                                    c^T K c for its coefficients c over the rows)
  s_i,t,k = g'_t,k . grad v_i     (target t's g' restricted to layer group k: every component's G is c^T s_t,k)

Several targets (D', the training chosen responses, ...) share the pass: their g' are stacked per parameter
([T, *shape]) and each parameter's contribution is dotted with all of them at once, so K and every target's s
cost one backward; only the dot products (not the per-row gradients or the Gram terms) grow with T.

Each parameter's contribution is taken by whichever route is cheaper for its shape:
  ghost        K_ij += sum_{t in i, s in j} (a_t . a_s)(g_t . g_s)  and  s_i += sum_{t in i} g_t . (g' a_t):
               no per-row gradient at all; costs (tokens)^2 (in + out), cheap for short rows;
  materialise  the per-row gradients of this one parameter (in blocks of output rows, at most `block_elements`
               numbers at a time), dotted with each other and with g': costs one weight gradient, cheaper at the
               paper's lengths (hundreds of tokens) for hidden sizes up to a few thousand.
Embeddings take the per-row sums of their output gradients by token id (sparse: only the ids that occur);
biases and the weights of LayerNorm / RMSNorm take sum_t g_t and sum_t g_t * normalised input directly.
Parameters themselves need no gradient during the pass: the backward computes only activation gradients, so
the pass costs about one ordinary training backward, and memory stays the model, g', the activations of one
batch and one parameter's per-row blocks. Products are taken in float32 (float64 for a float64 model) and
accumulated in float64, as the vmap path does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

ROUTES = ("auto", "ghost", "materialise")


def _kind(module: nn.Module) -> str | None:
    """What a module's parameters are, for the per-row gradient formulas (None: no formula). Only the stock
    forward counts: a subclass that changes it (quantised or adapter layers) may compute something else."""
    if type(module).forward is nn.Linear.forward:
        return "linear"
    if type(module) is Conv1D:
        return "conv1d"
    if type(module).forward is nn.Embedding.forward and module.max_norm is None:
        return "embedding"
    if type(module).forward is nn.LayerNorm.forward:
        return "layernorm"
    if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter):
        return "rmsnorm"  # the forward is checked against weight * normalised input at its first call
    return None


def check_supported(model: nn.Module) -> None:
    """Every trainable parameter must be owned only by modules the formulas cover (as their weight or bias); name
    those that are not."""
    uncovered = []
    for mname, module in model.named_modules():
        for n, p in module.named_parameters(recurse=False):
            if p.requires_grad and (_kind(module) is None or n not in ("weight", "bias")):
                uncovered.append(f"{mname}.{n} ({type(module).__name__})")
    if uncovered:
        raise ValueError(f"analysis.method=ghost has no per-sequence gradient formula for {uncovered}; "
                         "use analysis.method=vmap or jvp for this model")
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5 renamed it
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        raise ValueError("analysis.method=ghost: turn gradient checkpointing off (it re-runs the forward hooks)")


def _normalised(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm / RMSNorm input without its affine part (the factor each weight multiplies)."""
    if kind == "layernorm":
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    xf = x.to(torch.float32)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _block_stats(block: torch.Tensor, gp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(block @ g'^T [n, T], block @ block.T) in float64 for per-row gradient blocks [n, m] and the targets' g'
    [T, m...] (None: K only, dots [n, 0]): a component's G = c^T s and
    norm^2 = c^T K c sum large terms of both signs (chosen and rejected gradients nearly cancel), so rounding in
    s and K is amplified; float32 here cost ~1e-4 relative on the TOT norm at Pythia-160M shape, float64 ~1e-6
    (a plain backward's). Only n x m numbers are cast: cheap next to the per-row gradients themselves."""
    b64 = block.double()
    dots = b64 @ gp.reshape(len(gp), -1).double().T if gp is not None else \
        torch.zeros(len(b64), 0, dtype=torch.float64, device=b64.device)
    return dots, b64 @ b64.T


def _live_tokens(a: torch.Tensor, g: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the tokens whose output gradient is exactly zero (they add nothing to any formula): the output head
    sees gradient only at completion tokens. Rows keep their order; shorter rows are padded with zero-gradient
    tokens. Worth it only when at least a tenth of the tokens go."""
    if a.shape[0] != n or g.shape[0] != n:
        return a, g
    a, g = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    live = g.ne(0).any(-1)
    keep = int(live.sum(1).max())
    if keep > 0.9 * live.shape[1]:
        return a, g
    idx = torch.argsort((~live).to(torch.uint8), dim=1, stable=True)[:, :max(keep, 1), None]
    return a.gather(1, idx.expand(-1, -1, a.shape[-1])), g.gather(1, idx.expand(-1, -1, g.shape[-1]))


@dataclass
class _Call:
    """One forward call of a covered module: what its parameters' per-row gradients are made of."""

    module: nn.Module
    kind: str
    inp: torch.Tensor  # layer input (linear / conv1d), token ids (embedding), normalised input (norms)
    grad: torch.Tensor | None = None  # output gradient, set during the backward
    open_params: int = 0  # its parameters not finished yet: the call's tensors are dropped at 0


@dataclass
class _Accumulator:
    n: int
    dots: torch.Tensor  # n x T x 3
    gram: torch.Tensor  # n x n
    pending: dict = field(default_factory=dict)  # id(param) -> calls seen in the backward so far


class SequenceGradientStats:
    """Hooks that turn one backward of sum_i v_i into K (n x n) and s (n x T x 3), parameter by parameter.

    `dprime`: {name: g' tensor} over the trainable parameters, or a `gradients.TargetGradients` (T targets' g'
    stacked per parameter), or None (K only, s is n x 1 x 0s); `groups`: {name: 0/1/2} their layer groups;
    `route`: auto (the cheaper per parameter) | ghost | materialise (tests force each)."""

    def __init__(self, model: nn.Module, dprime: dict, groups: dict, route: str = "auto",
                 block_elements: int = 2 ** 26):
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        check_supported(model)
        self.model, self.route, self.block = model, route, block_elements
        self.named = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}
        from .gradients import as_targets

        self.dprime = None if dprime is None else as_targets(dprime).grads  # {name: [T, *shape]}
        self.n_targets = 1 if dprime is None else len(next(iter(self.dprime.values())))
        self.groups = groups
        self.routes_taken: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ the pass
    def __call__(self, values_fn, n: int):
        """Run `values_fn()` -> n per-row scalars (with the hooks on) and one backward of their sum.
        Returns (values [n] float64, s [n, T, 3] float64, K [n, n] float64)."""
        model = self.model
        device = next(model.parameters()).device
        acc = _Accumulator(n, torch.zeros(n, self.n_targets, 3, dtype=torch.float64, device=device),
                           torch.zeros(n, n, dtype=torch.float64, device=device))
        calls: dict[int, list[_Call]] = {}  # id(param) -> its module's calls in the forward
        handles = []
        trainable = [p for _, p in self.named.values()]
        try:
            for p in trainable:
                p.requires_grad_(False)  # activation gradients only: the formulas make the parameters' own
            for module in model.modules():
                kind = _kind(module)
                if kind is not None and any(id(p) in self.named for p in module.parameters(recurse=False)):
                    handles.append(module.register_forward_hook(self._forward_hook(kind, calls, acc, n)))
            values = values_fn()
            if values.shape != (n,):
                raise ValueError(f"values_fn must return {n} per-row scalars, got shape {tuple(values.shape)}")
            values.sum().backward()
            for key in list(calls):  # parameters whose output gradient never arrived (unused) contribute 0
                self._finish(key, calls.pop(key), acc)
        finally:
            for h in handles:
                h.remove()
            for p in trainable:
                p.requires_grad_(True)
        return values.detach().double(), acc.dots, acc.gram

    def _forward_hook(self, kind: str, calls: dict, acc: _Accumulator, n: int):
        def hook(module, args, output):
            x = args[0] if args else None
            if kind == "embedding":
                # the leaf every gradient flows to; a broadcast lookup (GPT-2's positions, batch 1) is expanded
                # to the n rows so that its output gradient stays per row instead of summed over them
                saved, output = x, output.detach().expand(n, *output.shape[1:]).contiguous().requires_grad_(True)
            elif kind in ("layernorm", "rmsnorm"):
                saved = _normalised(module, kind, x.detach())
                self._check_affine(module, kind, saved, output)
            else:
                saved = x.detach()
            if saved.shape[0] not in (1, n):
                raise ValueError(f"ghost: {type(module).__name__} got a batch of {saved.shape[0]} rows, expected {n}")
            params = [p for p in module.parameters(recurse=False) if id(p) in self.named]
            call = _Call(module, kind, saved, open_params=len(params))
            for p in params:
                calls.setdefault(id(p), []).append(call)
            if output.requires_grad:
                output.register_hook(self._grad_hook(call, params, calls, acc))
            return output if kind == "embedding" else None
        return hook

    @staticmethod
    def _check_affine(module, kind, xhat, output) -> None:
        """The formulas assume output = weight * normalised (+ bias); a norm that differs (e.g. Gemma's 1 + w) is
        refused rather than computed wrongly."""
        if getattr(module, "_ghost_checked", False):
            return
        with torch.no_grad():
            expect = xhat * module.weight
            if getattr(module, "bias", None) is not None:
                expect = expect + module.bias
            ok = torch.allclose(expect.float(), output.detach().float(), rtol=1e-2, atol=1e-3)
        if not ok:
            raise ValueError(f"ghost: {type(module).__name__} is not weight * normalised input (+ bias); "
                             "use analysis.method=vmap or jvp for this model")
        module._ghost_checked = True

    def _grad_hook(self, call: _Call, params, calls: dict, acc: _Accumulator):
        def hook(grad):
            call.grad = grad.detach()
            if call.kind in ("linear", "conv1d"):
                call.inp, call.grad = _live_tokens(call.inp, call.grad, acc.n)
            for p in params:  # a parameter is done once every call of it has its output gradient
                done = acc.pending.get(id(p), 0) + 1
                acc.pending[id(p)] = done
                if id(p) in calls and done == len(calls[id(p)]):
                    self._finish(id(p), calls.pop(id(p)), acc)
        return hook

    # ------------------------------------------------------------------------------------------ one parameter
    def _finish(self, key: int, calls: list[_Call], acc: _Accumulator) -> None:
        name, p = self.named[key]
        live = [c for c in calls if c.grad is not None]
        if live:
            self._add(name, p, live, acc)
        for c in calls:  # free the activations as soon as nothing needs them (the graph keeps the closures)
            c.open_params -= 1
            if c.open_params == 0:
                c.inp = c.grad = None

    def _add(self, name: str, p, calls: list[_Call], acc: _Accumulator) -> None:
        dtype = torch.promote_types(p.dtype, torch.float32)
        gp = None if self.dprime is None else self.dprime[name].to(dtype)  # [T, *shape]; None: K only
        k = self.groups[name]
        if len(calls) == 1 and self._use_ghost(calls[0], p, acc.n):
            dots, gram = self._ghost(calls[0], p, gp, acc.n, dtype)
            self.routes_taken[name] = "ghost"
        elif len(calls) == 1 and calls[0].kind == "embedding":
            dots, gram = self._embedding_rows(calls[0], gp, acc.n, dtype)
            self.routes_taken[name] = "sparse"
        else:
            dots, gram = self._materialise(calls, p, gp, acc.n, dtype)
            self.routes_taken[name] = "materialise"
        if gp is not None:
            acc.dots[:, :, k] += dots.double()
        acc.gram += gram.double()

    def _use_ghost(self, call: _Call, p, n: int) -> bool:
        if call.kind not in ("linear", "conv1d") or p.dim() != 2 or self.route == "materialise":
            return False
        if self.route == "ghost":
            return True
        tokens = call.inp[..., 0].numel()
        d_in, d_out = call.inp.shape[-1], call.grad.shape[-1]
        t = 0 if self.dprime is None else self.n_targets  # each target: g' a_t (ghost) or block @ g' (materialise)
        return tokens ** 2 * (d_in + d_out) + t * tokens * d_in * d_out < \
            2 * tokens * d_in * d_out + n * n * d_in * d_out + max(t - 1, 0) * n * d_in * d_out

    @staticmethod
    def _rows(t: torch.Tensor, n: int, dtype) -> torch.Tensor:
        """[n, tokens, features]: batch first, every other axis but the last folded into tokens."""
        t = t.to(dtype)
        return t.expand(n, *t.shape[1:]).reshape(n, -1, t.shape[-1]) if t.shape[0] == 1 else t.reshape(n, -1,
                                                                                                      t.shape[-1])

    def _ghost(self, call: _Call, p, gp, n: int, dtype):
        a, g = self._rows(call.inp, n, dtype), self._rows(call.grad, n, dtype)
        dots = torch.zeros(n, 0 if gp is None else len(gp), dtype=torch.float64, device=a.device)
        for t in range(dots.shape[1]):  # each target's g' [out, in] (Conv1D stores [in, out])
            w = gp[t].T if call.kind == "conv1d" else gp[t]
            dots[:, t] = ((a @ w.T) * g).double().sum((1, 2))  # sum_t g_t . (g' a_t), summed in float64
        gram = torch.empty(n, n, dtype=torch.float64, device=a.device)
        flat_a, flat_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        for i in range(n):  # one row against all: tokens x all tokens at a time, summed in float64 (_block_stats)
            prod = (a[i] @ flat_a.T) * (g[i] @ flat_g.T)
            gram[i] = prod.reshape(a.shape[1], n, a.shape[1]).double().sum((0, 2))
        return dots, gram

    def _embedding_rows(self, call: _Call, gp, n: int, dtype):
        """Per-row embedding gradients on the ids that occur only (sparse), in blocks of ids."""
        g = self._rows(call.grad, n, dtype)
        ids = call.inp.expand(n, *call.inp.shape[1:]).reshape(n, -1)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if call.module.padding_idx is not None:
            keep &= ids != call.module.padding_idx  # the padding row gets no gradient
        uniq, inv = torch.unique(ids[keep], return_inverse=True)
        slot = torch.full_like(ids, -1)
        slot[keep] = inv
        seq = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
        dots = torch.zeros(n, 0 if gp is None else len(gp), dtype=torch.float64, device=g.device)
        gram = torch.zeros(n, n, dtype=torch.float64, device=g.device)
        step = max(1, self.block // (n * g.shape[-1]))
        for u0 in range(0, len(uniq), step):
            u1 = min(len(uniq), u0 + step)
            sel = (slot >= u0) & (slot < u1)
            block = torch.zeros(n * (u1 - u0), g.shape[-1], dtype=dtype, device=g.device)
            block.index_add_(0, (seq * (u1 - u0) + slot - u0)[sel], g[sel])
            d, k = _block_stats(block.reshape(n, -1), None if gp is None else gp[:, uniq[u0:u1]])
            dots += d
            gram += k
        return dots, gram

    def _materialise(self, calls: list[_Call], p, gp, n: int, dtype):
        rows = p.shape[0]
        per_row = max(1, p[0].numel())
        step = max(1, self.block // (n * per_row))
        dots = torch.zeros(n, 0 if gp is None else len(gp), dtype=torch.float64, device=p.device)
        gram = torch.zeros(n, n, dtype=torch.float64, device=p.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block = sum(self._per_row_block(c, p, n, r0, r1, dtype) for c in calls).reshape(n, -1)
            d, k = _block_stats(block, None if gp is None else gp[:, r0:r1])
            dots += d
            gram += k
        return dots, gram

    def _per_row_block(self, call: _Call, p, n: int, r0: int, r1: int, dtype) -> torch.Tensor:
        """Rows r0:r1 of parameter p's per-row gradients from one call: [n, r1 - r0, ...]."""
        g = self._rows(call.grad, n, dtype)
        module, kind = call.module, call.kind
        if kind == "embedding":
            ids = call.inp.expand(n, *call.inp.shape[1:]).reshape(n, -1)
            keep = (ids >= r0) & (ids < r1)
            if module.padding_idx is not None:
                keep &= ids != module.padding_idx  # the padding row gets no gradient
            out = torch.zeros(n * (r1 - r0), g.shape[-1], dtype=dtype, device=g.device)
            seq = torch.arange(n, device=g.device)[:, None].expand_as(ids)
            out.index_add_(0, (seq * (r1 - r0) + ids - r0)[keep], g[keep])
            return out.reshape(n, r1 - r0, -1)
        if p is getattr(module, "bias", None):
            return g[..., r0:r1].sum(1)
        x = self._rows(call.inp, n, dtype)
        if kind in ("layernorm", "rmsnorm"):
            return (g[..., r0:r1] * x[..., r0:r1]).sum(1)
        if kind == "linear":  # weight [out, in]
            return torch.einsum("nto,nti->noi", g[..., r0:r1], x)
        return torch.einsum("nti,nto->nio", x[..., r0:r1], g)  # conv1d weight [in, out]
