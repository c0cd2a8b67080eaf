"""Pairwise objectives, one registered function each: (PairTerms, algo) -> Decomposition (see pairwise.py).

Each says how hard its loss pushes log pi(y+) up and log pi(y-) down, per pair (the detached, signed weights of
its gradient), and what it ranks for TOP/MID/BOT. `decompose` is what the trainer, the loss check and the G
analysis call: the objective, then the controlled schedule when `algo.t1`/`algo.t2` are set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from . import objective_of, register_objective
from .pairwise import Decomposition, PairTerms, PairwiseConfig, below, controlled, lambda_at, schedule_lambda


def decompose(t: PairTerms, algo) -> Decomposition:
    """The registered objective's decomposition of this batch, with the generic controlled schedule applied."""
    spec = objective_of(algo)
    d = spec.fn(t, algo)
    return d if spec.schedules_itself else controlled(d, t, algo)


def _sigmoid_pair_loss(z: torch.Tensor, beta: float, pos_scale, neg_scale, scalars=None) -> Decomposition:
    """-log sigmoid(z) with z = beta (a logratio+ - b logratio-): d/dlogpi(y+) = -beta a sigmoid(-z); the thirds
    rank omega = beta sigmoid(-z) on both sides, as the paper's Eq. 8-10."""
    omega = (beta * torch.sigmoid(-z)).detach()
    return Decomposition(-F.logsigmoid(z), omega * pos_scale, omega * neg_scale, omega, omega, {}, scalars or {})


@register_objective("dpo", family="dpo", schema=PairwiseConfig, label="DPO")
def dpo(t: PairTerms, algo) -> Decomposition:
    """Eq. 4; omega = beta sigmoid(-beta[(logratio+) - (logratio-)]) (Eq. 5)."""
    z = algo.beta * ((t.chosen - t.ref_chosen) - (t.rejected - t.ref_rejected))
    return _sigmoid_pair_loss(z, algo.beta, 1.0, 1.0)


@dataclass
class CDPOConfig(PairwiseConfig):
    """Controlled DPO (Eq. 32): lambda = clip((t - t1) / (t2 - t1), 0, 1) moves weight from y+ to y-.

    Not conservative (label-smoothed) DPO, which other code bases also call cDPO."""

    name: str = "cdpo"
    t1: int = MISSING
    t2: int = MISSING


def cdpo_lambda(step: int, t1: int, t2: int) -> float:
    return schedule_lambda(step, t1, t2)


@register_objective("cdpo", family="dpo", schema=CDPOConfig, label="cDPO", schedules_itself=True)
def cdpo(t: PairTerms, algo) -> Decomposition:
    """Eq. 32: -log sigmoid(beta[(1 - lambda) logratio+ - lambda logratio-]); lambda from t1/t2 or a controller."""
    lam = lambda_at(t, algo)
    z = algo.beta * ((1 - lam) * (t.chosen - t.ref_chosen) - lam * (t.rejected - t.ref_rejected))
    return _sigmoid_pair_loss(z, algo.beta, 1.0 - lam, lam, {"lambda": lam})


# ------------------------------------------------------------------------------------------ shared pieces


def _lengths(t: PairTerms, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """|y+|, |y-| (completion tokens): length-normalised objectives cannot run without them."""
    if t.chosen_len is None or t.rejected_len is None:
        raise ValueError(f"objective {name!r} normalises by completion length: build its PairTerms with "
                         "build_pair_terms(..., chosen_completion=, rejected_completion=)")
    return t.chosen_len, t.rejected_len


def _nll(t: PairTerms, alpha: float, name: str) -> tuple[torch.Tensor, dict]:
    """alpha x the token-mean NLL of y+ over the batch (TRL's cross-entropy on every chosen completion token), as a
    per-pair loss whose mean is that value: pair i carries alpha n / sum_j |y+_j| on -log pi(y+_i)."""
    chosen_len, _ = _lengths(t, name)
    coef = (alpha * len(chosen_len) / chosen_len.sum() * torch.ones_like(chosen_len)).detach()
    return -coef * t.chosen, {"NLL": (coef, torch.zeros_like(coef))}


def _with_nll(d: Decomposition, t: PairTerms, alpha: float, name: str) -> Decomposition:
    loss, extras = _nll(t, alpha, name)
    return Decomposition(d.loss + loss, d.w_pos, d.w_neg, d.rank_pos, d.rank_neg, {**d.extras, **extras},
                         d.scalars)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ------------------------------------------------------------------------------------------ IPO, SimPO


@register_objective("ipo", family="dpo", schema=PairwiseConfig, label="IPO")
def ipo(t: PairTerms, algo) -> Decomposition:
    """IPO (Azar et al. 2023, Eq. 17), length-normalised as TRL's loss_type="ipo": (h - 1/(2 tau))^2 with
    h = logratio+/|y+| - logratio-/|y-| and tau = beta. Weights 2 (1/(2 tau) - h) / |y|: they flip sign once the
    margin passes its target, pulling y+ down and y- up."""
    len_pos, len_neg = _lengths(t, "ipo")
    h = (t.chosen - t.ref_chosen) / len_pos - (t.rejected - t.ref_rejected) / len_neg
    target = 1 / (2 * algo.beta)
    g = (2 * (target - h)).detach()
    return Decomposition((h - target) ** 2, g / len_pos, g / len_neg)


@dataclass
class SimPOConfig(PairwiseConfig):
    """SimPO (Meng et al. 2024): no reference model, average log-probs, target margin gamma (SimPO's Llama-3 base
    setting: beta 2, gamma 1)."""

    name: str = "simpo"
    beta: float = 2.0
    gamma: float = 1.0

    @staticmethod
    def problems(a) -> list[tuple[str, str]]:
        return PairwiseConfig.problems(a) + below(a, "gamma", why="a target margin")


@register_objective("simpo", family="dpo", schema=SimPOConfig, label="SimPO")
def simpo(t: PairTerms, algo) -> Decomposition:
    """-log sigmoid(beta (log pi(y+)/|y+| - log pi(y-)/|y-|) - gamma); weights omega/|y| per side with
    omega = beta sigmoid(-z) (TRL: CPOTrainer, loss_type="simpo", cpo_alpha=0)."""
    len_pos, len_neg = _lengths(t, "simpo")
    z = algo.beta * (t.chosen / len_pos - t.rejected / len_neg) - algo.gamma
    omega = (algo.beta * torch.sigmoid(-z)).detach()
    return Decomposition(-F.logsigmoid(z), omega / len_pos, omega / len_neg)


# ------------------------------------------------------------------------------------------ NLL-anchored


@dataclass
class NLLAnchoredConfig(PairwiseConfig):
    """An objective plus alpha x the token-mean NLL of the chosen responses (its own component, NLL)."""

    alpha: float = 1.0

    @staticmethod
    def problems(a) -> list[tuple[str, str]]:
        return PairwiseConfig.problems(a) + below(a, "alpha", why="the NLL term's weight")


@dataclass
class CPOConfig(NLLAnchoredConfig):
    """CPO (Xu et al. 2024): reference-free sigmoid loss on summed log-probs plus alpha NLL(y+) (TRL's defaults)."""

    name: str = "cpo"


@register_objective("cpo", family="dpo", schema=CPOConfig, label="CPO", extra_components=("NLL",))
def cpo(t: PairTerms, algo) -> Decomposition:
    """-log sigmoid(beta (log pi(y+) - log pi(y-))) + alpha NLL(y+); w+ = w- = beta sigmoid(-z), NLL alpha n/sum|y+|
    (TRL: CPOTrainer, loss_type="sigmoid")."""
    z = algo.beta * (t.chosen - t.rejected)
    return _with_nll(_sigmoid_pair_loss(z, algo.beta, 1.0, 1.0), t, algo.alpha, "cpo")


@dataclass
class RPOConfig(NLLAnchoredConfig):
    """RPO (Pang et al. 2024): DPO plus alpha NLL(y+) (TRL: loss_type=["sigmoid", "sft"], loss_weights=[1, alpha])."""

    name: str = "rpo"


@register_objective("rpo", family="dpo", schema=RPOConfig, label="RPO", extra_components=("NLL",))
def rpo(t: PairTerms, algo) -> Decomposition:
    """DPO (Eq. 4) + alpha NLL(y+); w+ = w- = omega as DPO, NLL alpha n/sum|y+|."""
    return _with_nll(dpo(t, algo), t, algo.alpha, "rpo")


@register_objective("orpo", family="dpo", schema=PairwiseConfig, label="ORPO", extra_components=("NLL",))
def orpo(t: PairTerms, algo) -> Decomposition:
    """ORPO (Hong et al. 2024): NLL(y+) - beta log sigmoid(o), o = log odds(y+) - log odds(y-), odds(y) = e^p/(1-e^p)
    of the average log-prob p = log pi(y)/|y|; beta is ORPO's lambda (TRL's name). do/dp+ = 1/(1 - e^p+), so
    w+ = beta sigmoid(-o) / ((1 - e^p+) |y+|) = beta / ((1 - e^p+ + e^p+ (e^-p- - 1)) |y+|), a form that stays finite
    as y+ becomes certain (p+ -> 0, where autograd of the loss gives 0/0), and w- = beta sigmoid(-o) / ((1 - e^p-)
    |y-|). The NLL counts y+'s completion tokens (ORPO's Eq. 2; TRL's ORPOTrainer also counts the prompt's)."""
    len_pos, len_neg = _lengths(t, "orpo")
    p_pos, p_neg = t.chosen / len_pos, t.rejected / len_neg
    log_odds = (p_pos - p_neg) - (_log1mexp(p_pos) - _log1mexp(p_neg))
    p_pos_, p_neg_ = p_pos.detach(), p_neg.detach()
    w_pos = algo.beta / ((-torch.expm1(p_pos_) + torch.exp(p_pos_) * torch.expm1(-p_neg_)) * len_pos)
    w_neg = algo.beta * torch.sigmoid(-log_odds.detach()) / (-torch.expm1(p_neg_) * len_neg)
    return _with_nll(Decomposition(-algo.beta * F.logsigmoid(log_odds), w_pos, w_neg), t, 1.0, "orpo")


# ------------------------------------------------------------------------------------------ DPOP


@dataclass
class DPOPConfig(PairwiseConfig):
    """DPO-Positive (Pal et al. 2024, "Smaug"): DPO with a penalty dpop_lambda max(0, log pi_ref(y+) - log pi(y+))
    inside the sigmoid, so y+'s likelihood does not fall below the reference's (the paper's lambda = 50)."""

    name: str = "dpop"
    dpop_lambda: float = 50.0

    @staticmethod
    def problems(a) -> list[tuple[str, str]]:
        return PairwiseConfig.problems(a) + below(a, "dpop_lambda")


@register_objective("dpop", family="dpo", schema=DPOPConfig, label="DPOP")
def dpop(t: PairTerms, algo) -> Decomposition:
    """-log sigmoid(beta [logratio+ - logratio- - lambda max(0, -logratio+)]); w- = omega = beta sigmoid(-z),
    w+ = omega (1 + lambda) where y+ is below the reference, omega elsewhere (max's subgradient 0 at the kink)."""
    logratio_pos = t.chosen - t.ref_chosen
    below = (logratio_pos < 0).to(t.chosen.dtype).detach()
    z = algo.beta * (logratio_pos - (t.rejected - t.ref_rejected) - algo.dpop_lambda * torch.relu(-logratio_pos))
    return _sigmoid_pair_loss(z, algo.beta, 1.0 + algo.dpop_lambda * below, 1.0)


# ------------------------------------------------------------------------------------------ KTO


@dataclass
class KTOConfig(PairwiseConfig):
    """KTO (Ethayarajh et al. 2024) on preference pairs (TRL's defaults). Its reference point z0 is the batch's
    detached mean policy/reference log-ratio over the responses the loss sees, clamped at 0 (TRL estimates the
    same KL from mismatched prompt-completion pairs; the G analysis takes the mean over its whole sample)."""

    name: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @staticmethod
    def problems(a) -> list[tuple[str, str]]:
        return PairwiseConfig.problems(a) + [p for key in ("desirable_weight", "undesirable_weight")
                                             for p in below(a, key, strict=True)]


@dataclass
class KTOUnpairedConfig(KTOConfig):
    name: str = "kto_unpaired"


def _kto_sides(t: PairTerms, algo, seen_pos: torch.Tensor, seen_neg: torch.Tensor):
    """Each side's KTO loss and gradient weight per pair, z0 from the responses the loss sees (masks seen_pos,
    seen_neg): 1 - sigmoid(beta (logratio+ - z0)) for y+, 1 - sigmoid(beta (z0 - logratio-)) for y-, whose
    derivatives are beta sigmoid' on each side."""
    r_pos, r_neg = t.chosen - t.ref_chosen, t.rejected - t.ref_rejected
    z0 = torch.cat([r_pos[seen_pos], r_neg[seen_neg]]).detach().mean().clamp(min=0)
    u, v = algo.beta * (r_pos - z0), algo.beta * (z0 - r_neg)
    loss_pos = algo.desirable_weight * (1 - torch.sigmoid(u))
    loss_neg = algo.undesirable_weight * (1 - torch.sigmoid(v))
    w_pos = (algo.desirable_weight * algo.beta * torch.sigmoid(u) * torch.sigmoid(-u)).detach()
    w_neg = (algo.undesirable_weight * algo.beta * torch.sigmoid(v) * torch.sigmoid(-v)).detach()
    return loss_pos, loss_neg, w_pos, w_neg, {"kto/z0": float(z0)}


@register_objective("kto", family="dpo", schema=KTOConfig, label="KTO")
def kto(t: PairTerms, algo) -> Decomposition:
    """Each pair is one desirable (y+) and one undesirable (y-) example; the loss is TRL's mean over the 2n
    examples, so a pair carries half of each: w+ = lambda_D beta sigmoid'(u) / 2, w- = lambda_U beta sigmoid'(v) / 2."""
    both = torch.ones_like(t.chosen, dtype=torch.bool)
    loss_pos, loss_neg, w_pos, w_neg, scalars = _kto_sides(t, algo, both, both)
    return Decomposition((loss_pos + loss_neg) / 2, w_pos / 2, w_neg / 2, scalars=scalars)


def unpaired_side(t: PairTerms) -> torch.Tensor:
    """True where a pair keeps y+ (even content hash of y+), False where it keeps y- (the KTO paper's
    one-output-per-input ablation): the same draw in the trainer and the G analysis, whatever the padding."""
    if t.side_key is None:
        raise ValueError("kto_unpaired draws a side per pair from PairTerms.side_key: build its PairTerms with "
                         "build_pair_terms(..., chosen_ids=, chosen_completion=)")
    return t.side_key % 2 == 0


@register_objective("kto_unpaired", family="dpo", schema=KTOUnpairedConfig, label="KTO-unpaired")
def kto_unpaired(t: PairTerms, algo) -> Decomposition:
    """KTO on one response per pair (the other gets weight 0), mean over the n kept examples as TRL's. The thirds
    rank the weight each side would have if kept, so every third holds kept responses of both sides."""
    keep_pos = unpaired_side(t)
    loss_pos, loss_neg, w_pos, w_neg, scalars = _kto_sides(t, algo, keep_pos, ~keep_pos)
    kept = keep_pos.to(t.chosen.dtype)
    return Decomposition(torch.where(keep_pos, loss_pos, loss_neg), w_pos * kept, w_neg * (1 - kept), w_pos, w_neg,
                         scalars={**scalars, "kto_unpaired/pos_share": float(kept.mean())})
