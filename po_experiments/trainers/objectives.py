"""The DPO family as registered functions (verl-style): an algorithm says how hard to push each side of a pair,
a component says which pairs/sides it covers, and the training objective is their product.

Every algorithm returns a `Decomposition`: the loss it reports, and detached per-pair weights w+ and w- such that
its gradient equals the gradient of  -w+ log pi(y+) + w- log pi(y-)  (Eq. 5 for DPO). Components are masks over
(pair, side): POS/NEG pick a side (Eq. 6-7), TOP/MID/BOT pick pairs by rank thirds of omega (Eq. 8-10). Because
the surrogate is linear in the masks, POS + NEG = TOT = TOP + MID + BOT exactly, in gradient.

A new algorithm is one `@register_algorithm` function plus `conf/algo/<name>.yaml`; a new component is one
`@register_component` function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ..registry import registry
import torch.nn.functional as F


@dataclass
class PairTerms:
    """Sequence log-probs of a batch of pairs under the policy (with grad) and the reference (without)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    step: int = 0  # optimizer steps completed, the paper's t


@dataclass
class Decomposition:
    loss: torch.Tensor  # per-pair value of the algorithm's own loss (what is logged)
    w_pos: torch.Tensor  # detached weight on -log pi(y+)
    w_neg: torch.Tensor  # detached weight on +log pi(y-)
    rank_by: torch.Tensor  # what TOP/MID/BOT thirds rank (omega)
    scalars: dict[str, float] = field(default_factory=dict)  # e.g. the schedule's lambda, for logging


# ------------------------------------------------------------------------------------------ algorithms

ALGORITHMS, register_algorithm = registry("algorithm")



def _sigmoid_pair_loss(z: torch.Tensor, beta: float, pos_scale, neg_scale, scalars=None) -> Decomposition:
    """-log sigmoid(z) with z = beta (a logratio+ - b logratio-): d/dlogpi(y+) = -beta a sigmoid(-z)."""
    omega = (beta * torch.sigmoid(-z)).detach()
    return Decomposition(-F.logsigmoid(z), omega * pos_scale, omega * neg_scale, omega, scalars or {})


@register_algorithm("dpo")
def dpo(t: PairTerms, algo) -> Decomposition:
    """Eq. 4; omega = beta sigmoid(-beta[(logratio+) - (logratio-)]) (Eq. 5)."""
    z = algo.beta * ((t.chosen - t.ref_chosen) - (t.rejected - t.ref_rejected))
    return _sigmoid_pair_loss(z, algo.beta, 1.0, 1.0)


def cdpo_lambda(step: int, t1: int, t2: int) -> float:
    """lambda = clip((t - t1) / (t2 - t1), 0, 1): 0 before t1, 1 after t2."""
    return float(min(max((step - t1) / (t2 - t1), 0.0), 1.0))


@register_algorithm("cdpo")
def cdpo(t: PairTerms, algo) -> Decomposition:
    """Eq. 32: -log sigmoid(beta[(1 - lambda) logratio+ - lambda logratio-])."""
    lam = cdpo_lambda(t.step, algo.t1, algo.t2)
    z = algo.beta * ((1 - lam) * (t.chosen - t.ref_chosen) - lam * (t.rejected - t.ref_rejected))
    return _sigmoid_pair_loss(z, algo.beta, 1.0 - lam, lam, {"lambda": lam})


# ------------------------------------------------------------------------------------------ components

BOT, MID, TOP = 0, 1, 2


def rank_thirds(values: torch.Tensor) -> torch.Tensor:
    """0/1/2 = bottom/middle/top third of `values` by rank; ties are split by position, so with n >= 3 no third
    is ever empty (quantile thresholds would put all-equal values in one third)."""
    n = values.numel()
    order = torch.argsort(values.detach().flatten(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(n, device=values.device)
    return (3 * ranks) // max(n, 1)


COMPONENTS, register_component = registry("component")



def _both(keep: torch.Tensor):
    keep = keep.float()
    return keep, keep


@register_component("TOT")
def total(thirds):
    return _both(torch.ones_like(thirds))


@register_component("POS")
def positive(thirds):
    return torch.ones_like(thirds, dtype=torch.float), torch.zeros_like(thirds, dtype=torch.float)


@register_component("NEG")
def negative(thirds):
    return torch.zeros_like(thirds, dtype=torch.float), torch.ones_like(thirds, dtype=torch.float)


@register_component("TOP")
def top_third(thirds):
    return _both(thirds == TOP)


@register_component("MID")
def middle_third(thirds):
    return _both(thirds == MID)


@register_component("BOT")
def bottom_third(thirds):
    return _both(thirds == BOT)


def union_masks(names, thirds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair (pos, neg) 0/1 masks covered by any of `names`."""
    pos = torch.zeros_like(thirds, dtype=torch.float)
    neg = torch.zeros_like(thirds, dtype=torch.float)
    for name in names:
        p, n = COMPONENTS[name](thirds)
        pos, neg = torch.maximum(pos, p), torch.maximum(neg, n)
    return pos, neg


def active_masks(include, exclude, thirds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training objective's coverage: `include` minus `exclude` (e.g. TOT minus NEG = POS)."""
    inc_pos, inc_neg = union_masks(include, thirds)
    exc_pos, exc_neg = union_masks(exclude, thirds)
    return inc_pos * (1 - exc_pos), inc_neg * (1 - exc_neg)


def surrogate(d: Decomposition, t: PairTerms, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
    """Per-pair gradient-equivalent loss restricted to the masks: -w+ m+ log pi(y+) + w- m- log pi(y-)."""
    return -d.w_pos * pos_mask * t.chosen + d.w_neg * neg_mask * t.rejected


def objective(d: Decomposition, t: PairTerms, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
    """Mean loss whose value is the algorithm's loss and whose gradient is the masked surrogate's: the logged loss
    stays comparable across ablations, and with full masks the gradient is the algorithm's own."""
    s = surrogate(d, t, pos_mask, neg_mask)
    return (d.loss.detach() + s - s.detach()).mean()
