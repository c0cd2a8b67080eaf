"""The pairwise weight contract: what every pairwise objective returns, its components and its surrogate.

An objective sees a batch's `PairTerms` (policy and reference sequence log-probs, completion lengths) and returns
a `Decomposition`: the loss it reports per pair and detached, signed weights w+ and w- such that its gradient is
the gradient of  -w+ log pi(y+) + w- log pi(y-)  plus any extra term (an NLL anchor on y+), each extra term given
the same way as coefficients on the two log-probs (Eq. 5 for DPO: w+ = w- = omega). Weights are per side: IPO's
flip sign, SimPO's and ORPO's carry 1/|y|, DPOP's chosen side has its penalty.

Components are masks over (pair, side) and the extra terms: POS/NEG pick a side of the preference term (Eq. 6-7);
TOP/MID/BOT pick pairs by rank thirds (Eq. 8-10) of what the objective ranks on each side (omega for DPO, |w|
otherwise); an extra term is its own component. TOT = POS + NEG + extras = TOP + MID + BOT + extras exactly,
in gradient, because the surrogate is linear in the masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import BASE_COMPONENTS

BOT, MID, TOP = 0, 1, 2
MIN_FINAL_LAMBDA = 0.9  # a controlled schedule must nearly finish inside the run (cDPO case 3 ends at 0.93)


@dataclass
class PairwiseConfig:
    """Fields every pairwise objective has. `components`: the training objective as a union of components.
    `t1`/`t2` (optional): the paper's controlled schedule lambda = clip((t - t1)/(t2 - t1), 0, 1) put on any
    pairwise objective's weights, (1 - lambda) w+ and lambda w- (cDPO generalised; `cdpo` itself is Eq. 32)."""

    name: str = "dpo"
    family: str = "dpo"
    beta: float = 0.1
    components: list[str] = field(default_factory=lambda: ["TOT"])
    t1: Optional[int] = None
    t2: Optional[int] = None

    @staticmethod
    def step_settings(a, total: int) -> list[tuple[str, float, bool, str]]:
        """(key, value, inside a run of `total` steps, the rule) for its step-valued settings (run_length.check)."""
        if a.get("t1") is None:
            return []
        out = [("t1", a.t1, a.t1 < total, "negative learning starts inside the run")]
        if a.get("t2") is not None:
            final = min(1.0, (total - a.t1) / (a.t2 - a.t1)) if a.t2 > a.t1 else 1.0
            out.append(("t2", a.t2, final >= MIN_FINAL_LAMBDA,
                        f"lambda reaches {MIN_FINAL_LAMBDA} by the end (here {final:.2f})"))
        return out

    @staticmethod
    def problems(a) -> list[tuple[str, str]]:
        """(key, message) for each value out of range; config.validate raises on the first."""
        out = []
        if a.beta <= 0:
            out.append(("beta", f"must be > 0, got {a.beta}"))
        if (a.get("t1") is None) != (a.get("t2") is None):
            out.append(("t2" if a.get("t2") is None else "t1", "t1 and t2 are set together (or neither)"))
        elif a.get("t1") is not None:
            if a.t1 < 0:
                out.append(("t1", f"must be >= 0, got {a.t1}"))
            elif a.t2 <= a.t1:
                out.append(("t2", f"must be > algo.t1 ({a.t1}), got {a.t2}"))
        return out


def below(a, key: str, bound: float = 0.0, *, strict: bool = False, why: str = "") -> list[tuple[str, str]]:
    """A schema's `problems()` entry when algo.<key> is under `bound` (or at it, `strict`), else nothing."""
    value = a[key]
    if value > bound or (value == bound and not strict):
        return []
    return [(key, f"must be {'>' if strict else '>='} {bound:g}{f' ({why})' if why else ''}, got {value}")]


@dataclass
class PairTerms:
    """Sequence log-probs of a batch of pairs under the policy (with grad) and the reference (without)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_len: Optional[torch.Tensor] = None  # completion tokens of y+ (length-normalised objectives)
    rejected_len: Optional[torch.Tensor] = None
    step: int = 0  # optimizer steps completed, the paper's t
    side_key: Optional[torch.Tensor] = None  # a content hash per pair: which side an unpaired objective sees
    lam: Optional[float] = None  # a controller's lambda (controllers/), replacing the t1/t2 schedule's


def side_key(ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """A per-pair integer that depends only on the completion's tokens (not on padding or the prompt), so the
    trainer and the G analysis, which pad differently, draw the same side for an unpaired objective."""
    comp = completion_mask.long()
    position = comp.cumsum(1) * comp  # 1, 2, ... over the completion tokens, 0 elsewhere
    return ((ids.long() * (2 * position + 1)) % 1_000_003 * comp).sum(1)


def build_pair_terms(chosen, rejected, ref_chosen, ref_rejected, *, step: int = 0, chosen_ids=None,
                     chosen_completion=None, rejected_completion=None) -> PairTerms:
    """The one place PairTerms are made (trainer, loss check and G analysis): lengths and the side key from the
    completion masks of y+ and y- (shape batch x sequence, 1 on completion tokens)."""
    lengths = [m.sum(1).to(chosen.dtype).clamp(min=1) if m is not None else None
               for m in (chosen_completion, rejected_completion)]
    key = side_key(chosen_ids, chosen_completion) if chosen_ids is not None and chosen_completion is not None \
        else None
    return PairTerms(chosen, rejected, ref_chosen.detach(), ref_rejected.detach(), lengths[0], lengths[1], step, key)


@dataclass
class Decomposition:
    loss: torch.Tensor  # per-pair value of the objective's own loss (what is logged)
    w_pos: torch.Tensor  # detached weight on -log pi(y+) (signed)
    w_neg: torch.Tensor  # detached weight on +log pi(y-) (signed)
    rank_pos: Optional[torch.Tensor] = None  # what TOP/MID/BOT rank on the chosen side (default |w+|)
    rank_neg: Optional[torch.Tensor] = None  # ... and on the rejected side (default |w-|)
    # terms that are neither side: name -> (weight on -log pi(y+), weight on +log pi(y-)), e.g. NLL: (alpha/|y+|, 0)
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)  # e.g. the schedule's lambda, for logging

    @property
    def rank_by(self) -> torch.Tensor:
        """The chosen side's ranking (omega for DPO): logged as the weight distribution."""
        return self.rank_pos if self.rank_pos is not None else self.w_pos.abs()


def schedule_lambda(step: int, t1: int, t2: int) -> float:
    """lambda = clip((t - t1) / (t2 - t1), 0, 1): 0 before t1, 1 after t2 (paper Eq. 32)."""
    return float(min(max((step - t1) / (t2 - t1), 0.0), 1.0))


def lambda_at(t: PairTerms, algo) -> float:
    """The balance lambda of this batch: a controller's (`t.lam`, set by the trainer when controller != none),
    else the t1/t2 schedule's at step t."""
    return float(t.lam) if t.lam is not None else schedule_lambda(t.step, algo.t1, algo.t2)


def controlled(d: Decomposition, t: PairTerms, algo) -> Decomposition:
    """The controlled schedule on any pairwise objective: (1 - lambda) w+ and lambda w- (and extras untouched).
    The thirds keep ranking the uncontrolled weights, so they do not collapse to ties when lambda is 0 or 1."""
    if algo.get("t1") is None and t.lam is None:
        return d
    lam = lambda_at(t, algo)
    rank_pos = d.rank_pos if d.rank_pos is not None else d.w_pos.abs()
    rank_neg = d.rank_neg if d.rank_neg is not None else d.w_neg.abs()
    return Decomposition(d.loss, (1 - lam) * d.w_pos, lam * d.w_neg, rank_pos, rank_neg, d.extras,
                         {**d.scalars, "lambda": lam})


# ------------------------------------------------------------------------------------------ components


def rank_thirds(values: torch.Tensor) -> torch.Tensor:
    """0/1/2 = bottom/middle/top third of `values` by rank; ties are split by position, so with n >= 3 no third
    is ever empty (quantile thresholds would put all-equal values in one third)."""
    n = values.numel()
    order = torch.argsort(values.detach().flatten(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(n, device=values.device)
    return (3 * ranks) // max(n, 1)


@dataclass
class Thirds:
    pos: torch.Tensor  # 0/1/2 per pair, on the chosen side
    neg: torch.Tensor  # ... on the rejected side


def thirds_of(d: Decomposition) -> Thirds:
    """TOP/MID/BOT per side: ranked over the batch (training) or the whole sample (G analysis)."""
    pos = d.rank_pos if d.rank_pos is not None else d.w_pos.abs()
    neg = d.rank_neg if d.rank_neg is not None else d.w_neg.abs()
    return Thirds(rank_thirds(pos), rank_thirds(neg))


def _side_masks(name: str, th: Thirds) -> tuple[torch.Tensor, torch.Tensor]:
    one, zero = torch.ones_like(th.pos, dtype=torch.float), torch.zeros_like(th.pos, dtype=torch.float)
    if name == "TOT":
        return one, one
    if name == "POS":
        return one, zero
    if name == "NEG":
        return zero, one
    third = {"TOP": TOP, "MID": MID, "BOT": BOT}.get(name)
    if third is None:
        return zero, zero  # an extra term: covers neither side of the preference term
    return (th.pos == third).float(), (th.neg == third).float()


@dataclass
class Coverage:
    """What a set of components covers: the preference term's (pair, side) masks and the extra terms kept."""

    pos: torch.Tensor
    neg: torch.Tensor
    extras: frozenset


def coverage(include, exclude, th: Thirds, extras=()) -> Coverage:
    """`include` minus `exclude` (e.g. TOT minus NEG = POS); TOT includes every extra term."""
    def union(names):
        pos = torch.zeros_like(th.pos, dtype=torch.float)
        neg = torch.zeros_like(th.pos, dtype=torch.float)
        for name in names:
            p, n = _side_masks(name, th)
            pos, neg = torch.maximum(pos, p), torch.maximum(neg, n)
        kept = {e for e in extras if e in names or "TOT" in names}
        return pos, neg, kept

    ip, ineg, ie = union(include)
    ep, eneg, ee = union(exclude)
    return Coverage(ip * (1 - ep), ineg * (1 - eneg), frozenset(ie - ee))


def coefficients(d: Decomposition, cov: Coverage) -> tuple[torch.Tensor, torch.Tensor]:
    """(c+, c-): the covered part of the loss has the gradient of c+ log pi(y+) + c- log pi(y-)."""
    c_pos, c_neg = -d.w_pos * cov.pos, d.w_neg * cov.neg
    for name, (a_pos, a_neg) in d.extras.items():
        if name in cov.extras:
            c_pos, c_neg = c_pos - a_pos, c_neg + a_neg
    return c_pos, c_neg


def component_coefficients(d: Decomposition, components) -> dict[str, torch.Tensor]:
    """Per component, its coefficients on [grad log pi(y+_i); grad log pi(y-_i)] (the G analysis' input)."""
    th = thirds_of(d)
    out = {}
    for comp in components:
        c_pos, c_neg = coefficients(d, coverage([comp], [], th, d.extras))
        out[comp] = torch.cat([c_pos, c_neg])
    return out


def objective(d: Decomposition, t: PairTerms, cov: Coverage) -> torch.Tensor:
    """Mean loss whose value is the objective's loss and whose gradient is the covered surrogate's: the logged
    loss stays comparable across ablations, and with TOT the gradient is the objective's own."""
    c_pos, c_neg = coefficients(d, cov)
    s = c_pos * t.chosen + c_neg * t.rejected
    return (d.loss.detach() + s - s.detach()).mean()


__all__ = ["BASE_COMPONENTS", "BOT", "MID", "TOP", "Coverage", "Decomposition", "PairTerms", "PairwiseConfig",
           "Thirds", "build_pair_terms", "coefficients", "component_coefficients", "controlled", "coverage", "lambda_at",
           "objective", "rank_thirds", "schedule_lambda", "side_key", "thirds_of"]
