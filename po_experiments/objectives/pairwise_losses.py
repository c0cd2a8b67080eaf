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
from .pairwise import Decomposition, PairTerms, PairwiseConfig, controlled, schedule_lambda


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
    """Eq. 32: -log sigmoid(beta[(1 - lambda) logratio+ - lambda logratio-])."""
    lam = schedule_lambda(t.step, algo.t1, algo.t2)
    z = algo.beta * ((1 - lam) * (t.chosen - t.ref_chosen) - lam * (t.rejected - t.ref_rejected))
    return _sigmoid_pair_loss(z, algo.beta, 1.0 - lam, lam, {"lambda": lam})
