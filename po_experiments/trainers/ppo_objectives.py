"""The PPO family as registered per-token weightings of the clipped surrogate (paper Eq. 11-16, 33-35).

Tokens are split the way the paper splits them: POS (A >= 0) / NEG (A < 0), and TOP / MID / BOT thirds of |A|
ranked over the valid tokens of the whole rollout batch (by rank, so ties never empty a third). A weighting
returns one weight per token (cPPO: lambda on a third; hPPO: lambda(t) on A < 0); components are 0/1 masks.
Every loss is a sum over tokens divided by the number of valid tokens in the batch, so component losses, and
their gradients, add up exactly to the full loss.

A new variant is one `@register_weighting` function plus `conf/algo/<name>.yaml`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..registry import registry

from .objectives import BOT, MID, TOP

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
