"""The policy-gradient family: advantage estimators (registered objectives) and per-token weightings of the
clipped surrogate (paper Eq. 11-16, 33-35).

Tokens are split the way the paper splits them: POS (A >= 0) / NEG (A < 0), and TOP / MID / BOT thirds of |A|
ranked over the valid tokens of the whole rollout batch (by rank, so ties never empty a third). A weighting
returns one weight per token (cPPO: lambda on a third; hPPO: lambda(t) on A < 0); components are 0/1 masks.
Every loss is a sum over tokens divided by the number of valid tokens in the batch, so component losses, and
their gradients, add up exactly to the full loss.

A new weighting is one `@register_weighting` function; a new estimator one `@register_objective` function;
each plus `conf/algo/<name>.yaml`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..registry import registry
from . import register_objective
from .pairwise import BOT, MID, TOP


@dataclass
class PPOAlgoConfig:
    """PPO (Eq. 11) with per-token weights from a registered weighting (ppo, cppo_top, cppo_mid, hppo).

    `components` is the training objective over tokens (TOT, POS: A >= 0, NEG: A < 0, TOP/MID/BOT: thirds of |A|
    by rank over the rollout batch)."""

    name: str = "ppo"
    family: str = "ppo"
    weighting: str = "ppo"
    components: list[str] = field(default_factory=lambda: ["TOT"])
    lam: Optional[float] = None  # cPPO's weight on the top (Eq. 33) or middle (Eq. 34) third, in [0, 1]
    t3: Optional[float] = None  # hPPO's half period in optimizer steps (Eq. 35)
    tau: Optional[float] = None  # hPPO's largest downweighting of A < 0 tokens (Eq. 35)
    kl_coef: float = 0.05  # KL(pi || ref) penalty in the per-token reward
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    gae_lambda: float = 0.95
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    whiten_rewards: bool = False

    @staticmethod
    def problems(a) -> list[tuple[str, str]]:
        """(key, message) for each value out of range; config.validate raises on the first."""
        out = []
        if a.weighting not in WEIGHTINGS:
            out.append(("weighting", f"unknown weighting {a.weighting!r}; registered: {', '.join(sorted(WEIGHTINGS))}"))
        elif a.weighting.startswith("cppo") and not (a.lam is not None and 0.0 <= a.lam <= 1.0):
            out.append(("lam", f"must be in [0, 1], got {a.lam}"))
        elif a.weighting == "hppo":
            if not (a.t3 is not None and a.t3 > 0):
                out.append(("t3", f"must be > 0, got {a.t3}"))
            if not (a.tau is not None and a.tau > 0):
                out.append(("tau", f"must be > 0, got {a.tau}"))
        out += [(k, f"must be >= 0, got {a[k]}") for k in ("kl_coef", "cliprange_value", "vf_coef") if a[k] < 0]
        if not 0 < a.cliprange < 1:
            out.append(("cliprange", f"must be in (0, 1), got {a.cliprange}"))
        out += [(k, f"must be in [0, 1], got {a[k]}") for k in ("gamma", "gae_lambda") if not 0 <= a[k] <= 1]
        if a.num_ppo_epochs <= 0:
            out.append(("num_ppo_epochs", f"must be > 0, got {a.num_ppo_epochs}"))
        return out

# ------------------------------------------------------------------------------------------ thirds and masks


def token_thirds(advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """0/1/2 = BOT/MID/TOP third of |A| among valid tokens (ranked over the batch); -1 on padding."""
    flat_valid = valid.flatten().bool()
    values = advantages.detach().abs().flatten()[flat_valid]
    n = values.numel()
    thirds = torch.full_like(advantages, -1, dtype=torch.long).flatten()
    if n:
        order = torch.argsort(values, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(n, device=values.device)
        thirds[flat_valid] = (3 * ranks) // n
    return thirds.view_as(advantages)


TOKEN_COMPONENTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "TOT": lambda adv, thirds, valid: valid,
    "POS": lambda adv, thirds, valid: valid & (adv >= 0),  # Eq. 12
    "NEG": lambda adv, thirds, valid: valid & (adv < 0),  # Eq. 13
    "TOP": lambda adv, thirds, valid: thirds == TOP,  # Eq. 14
    "MID": lambda adv, thirds, valid: thirds == MID,  # Eq. 15
    "BOT": lambda adv, thirds, valid: thirds == BOT,  # Eq. 16
}


def token_mask(include, exclude, adv, thirds, valid) -> torch.Tensor:
    """Float mask of the tokens in any of `include` and in none of `exclude`."""
    keep = torch.zeros_like(valid, dtype=torch.bool)
    for name in include:
        keep |= TOKEN_COMPONENTS[name](adv, thirds, valid)
    for name in exclude:
        keep &= ~TOKEN_COMPONENTS[name](adv, thirds, valid)
    return keep.float()


# ------------------------------------------------------------------------------------------ weightings

WEIGHTINGS, register_weighting = registry("weighting")



@register_weighting("ppo")
def plain(adv, thirds, step, algo):
    """Eq. 11: every token weighs 1."""
    return torch.ones_like(adv), {}


@register_weighting("cppo_top")
def downweight_top(adv, thirds, step, algo):
    """Eq. 33: lambda on the top third of |A|, 1 elsewhere."""
    return torch.where(thirds == TOP, algo.lam, 1.0).to(adv.dtype), {"lambda": float(algo.lam)}


@register_weighting("cppo_mid")
def downweight_middle(adv, thirds, step, algo):
    """Eq. 34: lambda on the middle third of |A|, 1 elsewhere."""
    return torch.where(thirds == MID, algo.lam, 1.0).to(adv.dtype), {"lambda": float(algo.lam)}


def hppo_lambda(step: int, t3: float, tau: float) -> float:
    """Eq. 35: lambda = max(min(sin(pi t / t3), 0), -tau) + 1: 1 for t in [0, t3] (reinforcement), then down to
    1 - tau for t in (t3, 2 t3) (towards supervised), with period 2 t3."""
    return max(min(math.sin(math.pi * step / t3), 0.0), -tau) + 1.0


@register_weighting("hppo")
def hybrid(adv, thirds, step, algo):
    """Eq. 35: lambda(t) on tokens with A < 0."""
    lam = hppo_lambda(step, algo.t3, algo.tau)
    return torch.where(adv < 0, lam, 1.0).to(adv.dtype), {"lambda": lam}


# ------------------------------------------------------------------------------------------ losses


def clipped_surrogate(new_logprobs, old_logprobs, advantages, cliprange: float) -> torch.Tensor:
    """Per-token PPO loss max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old (= Eq. 11's -CLIP_A(r) A)."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange))


def policy_loss(per_token, weights, mask, valid) -> torch.Tensor:
    """Sum over the masked, weighted tokens / number of valid tokens: components add up to the whole."""
    return (per_token * weights * mask).sum() / valid.sum().clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t,
    computed backwards over the response positions (V after the last position is 0)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance), as PPO normalises advantages."""
    m = mask.bool()
    mean, var = x[m].mean(), x[m].var(unbiased=True)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


# ------------------------------------------------------------------------------------------ estimators


@torch.no_grad()
def with_advantages(r, *, kl_coef: float, kl_estimator: str, gamma: float, lam: float, whiten_rewards: bool):
    """Per-token reward = -beta KL(pi || ref) + the score on the last valid token; GAE; whitening over every valid
    token of `r` (the trainer's rollout: this process's batch; the G analysis: its whole sample)."""
    log_ratio = r.ref_logprobs - r.logprobs
    kl = -log_ratio if kl_estimator == "k1" else log_ratio.exp() - 1 - log_ratio
    rewards = (-kl_coef * kl).masked_fill(~r.valid, 0.0)
    last = r.valid.long().sum(1).clamp(min=1) - 1
    rewards[torch.arange(len(last)), last] += r.scores
    if whiten_rewards:
        rewards = whiten(rewards, r.valid, shift_mean=False).masked_fill(~r.valid, 0.0)
    r.rewards = rewards
    r.raw_advantages = gae(rewards, r.values, gamma, lam).masked_fill(~r.valid, 0.0)
    r.returns = r.raw_advantages + r.values
    r.advantages = whiten(r.raw_advantages, r.valid).masked_fill(~r.valid, 0.0)
    return r


# PPO and its paper variants share GAE with a value model; they differ by their default weighting (YAML).
for _name, _label, _row in (("ppo", "PPO", "PPO"), ("cppo", "cPPO-top", "cPPO"), ("cppo_mid", "cPPO-mid", "cPPO"),
                            ("hppo", "hPPO", "hPPO")):
    register_objective(_name, family="ppo", schema=PPOAlgoConfig, label=_label, table1_row=_row)(with_advantages)
