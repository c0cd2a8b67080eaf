"""The policy-gradient family: advantage estimators (registered objectives) and per-token weightings of the
clipped surrogate (paper Eq. 11-16, 33-35).

Estimators (the registered objectives' functions): GAE with a value model (ppo, cppo, cppo_mid, hppo), and the
critic-free ones: GRPO and DAPO (group-normalised scores), RLOO (leave-one-out baseline), REINFORCE++ (return to go
of KL-penalised rewards, whitened over the batch). Each carries `needs_critic`, `needs_groups` and `per_response`
(its advantage is constant within a response) as attributes; the trainer and the G analysis read them.

Tokens are split the way the paper splits them: POS (A >= 0) / NEG (A < 0), and TOP / MID / BOT thirds of |A|
ranked over the valid tokens of the whole rollout batch (by rank, so ties never empty a third), or, where A is
constant within a response, thirds of *responses* ranked by |A| (each response's tokens in its response's third).
A weighting returns one weight per token (cPPO: lambda on a third; hPPO: lambda(t) on A < 0); components are 0/1
masks. A KL(pi || ref) term in the *loss* (GRPO) is its own component "KL": TOT = POS + NEG + KL. Every loss is a
sum over tokens times one per-token normaliser (`aggregation_weights`: token mean, sequence mean, ...), the same
for every component, so component losses, and their gradients, add up exactly to the full loss.

A new weighting is one `@register_weighting` function; a new estimator one `@register_objective` function;
each plus `conf/algo/<name>.yaml`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..registry import registry
from . import OBJECTIVES, register_objective
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
    def step_settings(a, total: int) -> list[tuple[str, float, bool, str]]:
        """(key, value, inside a run of `total` updates, the rule) for its step-valued settings (run_length.check)."""
        if a.weighting == "hppo" and a.get("t3") is not None:
            return [("t3", a.t3, a.t3 < total, "the first down-weighted half period (from update t3) starts inside the run")]
        return []

    @staticmethod
    def problems(a) -> list[tuple[str, str]]:
        """(key, message) for each value out of range; config.validate raises on the first."""
        out = []
        spec = OBJECTIVES.get(a.name)
        k = a.get("group_size", 1)
        if spec is not None and getattr(spec.fn, "needs_groups", False) and not (k is not None and k >= 2):
            out.append(("group_size", f"{a.name} compares responses to the same prompt: must be >= 2, got {k}"))
        elif k is None or k < 1:
            out.append(("group_size", f"must be >= 1, got {k}"))
        for key in ("epsilon_low", "epsilon_high"):
            if a.get(key) is not None and not 0 < a[key] < 1:
                out.append((key, f"must be in (0, 1) or null (= cliprange), got {a[key]}"))
        if a.get("loss_aggregation", "token_mean") not in AGGREGATIONS:
            out.append(("loss_aggregation", f"must be one of {', '.join(AGGREGATIONS)}, got {a.loss_aggregation!r}"))
        if a.get("kl_in", "reward") not in ("reward", "loss"):
            out.append(("kl_in", f"must be reward or loss, got {a.kl_in!r}"))
        if a.get("kl_estimator", "k1") not in ("k1", "k3"):
            out.append(("kl_estimator", f"must be k1 or k3, got {a.kl_estimator!r}"))
        if spec is not None and (a.get("kl_in", "reward") == "loss") != ("KL" in spec.extra_components):
            where = "loss (its KL component)" if "KL" in spec.extra_components else "reward"
            out.append(("kl_in", f"{a.name} puts its KL penalty in the {where}, got {a.get('kl_in', 'reward')!r}"))
        if a.get("dynamic_sampling", False) and not (spec is not None and getattr(spec.fn, "needs_groups", False)):
            out.append(("dynamic_sampling", f"needs a group estimator (grpo, dapo, rloo), not {a.name}"))
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

@dataclass
class CriticFreeAlgoConfig(PPOAlgoConfig):
    """The policy-gradient settings beyond PPO's (GRPO, DAPO, RLOO, REINFORCE++). Their defaults here are PPO's
    behaviour (what `settings` gives a PPO run); each estimator's schema below sets its reference method's."""

    kl_estimator: str = "k1"  # KL in the reward: k1 = log pi - log ref (PPO, RLOO, REINFORCE++); the loss's is k3
    group_size: int = 1  # responses sampled per prompt; model.ppo.batch_size counts responses (prompts x group_size)
    epsilon_low: Optional[float] = None  # clip range below 1 (None: cliprange)
    epsilon_high: Optional[float] = None  # clip range above 1 (None: cliprange); DAPO's clip-higher sets it larger
    loss_aggregation: str = "token_mean"  # AGGREGATIONS: how per-token losses become the batch loss
    kl_in: str = "reward"  # "reward": -kl_coef KL per token in the reward; "loss": + kl_coef KL_k3 per token (GRPO)
    scale_rewards: bool = True  # GRPO/DAPO: divide by the group's std (Dr-GRPO: false)
    dynamic_sampling: bool = False  # drop groups whose scores are all equal (DAPO)


@dataclass
class GRPOAlgoConfig(CriticFreeAlgoConfig):
    """GRPO (DeepSeekMath; TRL GRPOConfig): 8 responses per prompt, KL_k3 in the loss with beta 0.04, sequence-mean
    then batch-mean loss, one gradient pass per rollout."""

    name: str = "grpo"
    group_size: int = 8
    kl_coef: float = 0.04
    kl_in: str = "loss"
    loss_aggregation: str = "grpo"
    num_ppo_epochs: int = 1


@dataclass
class DAPOAlgoConfig(CriticFreeAlgoConfig):
    """DAPO: clip-higher (0.2 / 0.28), token-level loss, no KL, dynamic sampling; several passes per rollout."""

    name: str = "dapo"
    group_size: int = 8
    kl_coef: float = 0.0
    epsilon_low: Optional[float] = 0.2
    epsilon_high: Optional[float] = 0.28
    loss_aggregation: str = "dapo"
    dynamic_sampling: bool = True
    num_ppo_epochs: int = 2


@dataclass
class RLOOAlgoConfig(CriticFreeAlgoConfig):
    """RLOO (TRL RLOOConfig): k = 4 responses, beta 0.05 on the k1 KL summed into the reward, REINFORCE on log pi(y)."""

    name: str = "rloo"
    group_size: int = 4
    kl_coef: float = 0.05
    loss_aggregation: str = "sequence_sum"
    num_ppo_epochs: int = 1


@dataclass
class ReinforcePPAlgoConfig(CriticFreeAlgoConfig):
    """REINFORCE++ (OpenRLHF): KL 0.01 per token in the reward, return to go, global whitening, token-mean loss."""

    name: str = "reinforce_pp"
    kl_coef: float = 0.01
    num_ppo_epochs: int = 1


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


def response_thirds(advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Thirds where A is constant within a response (GRPO, DAPO, RLOO): responses ranked by |A| over the batch
    (responses with a valid token), each response's valid tokens in its response's third; -1 on padding."""
    rows = valid.any(1)
    first = valid.long().argmax(1)  # A of the response = A at its first valid token
    per_row = advantages.detach().abs().gather(1, first[:, None])[:, 0]
    row_thirds = token_thirds(per_row[:, None], rows[:, None])[:, 0]
    return torch.where(valid, row_thirds[:, None].expand_as(valid), torch.full_like(row_thirds[:, None], -1))


def thirds_of(advantages: torch.Tensor, valid: torch.Tensor, algo) -> torch.Tensor:
    """The objective's thirds: by response where its estimator's A is per response, else by token."""
    per_response = getattr(OBJECTIVES[algo.name].fn, "per_response", False) if algo.name in OBJECTIVES else False
    return (response_thirds if per_response else token_thirds)(advantages, valid)


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
        if name in TOKEN_COMPONENTS:  # KL is no token set of the surrogate: `kl_active`
            keep |= TOKEN_COMPONENTS[name](adv, thirds, valid)
    for name in exclude:
        if name in TOKEN_COMPONENTS:
            keep &= ~TOKEN_COMPONENTS[name](adv, thirds, valid)
    return keep.float()


def kl_active(include, exclude) -> bool:
    """Whether a KL-in-the-loss term is trained: it is part of TOT and its own component KL."""
    return ("TOT" in include or "KL" in include) and "KL" not in exclude


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


# A controller's lambda (controllers/, controller=g_balance) replaces a weighting's own (cPPO's fixed lambda, hPPO's
# sine schedule), on the same tokens: the component each weighting's lambda weighs.
CONTROLLED = {"hppo": "NEG", "cppo_top": "TOP", "cppo_mid": "MID"}


def controlled_weights(adv, thirds, valid, weighting: str, lam: float):
    """(weights, scalars) of a weighting whose lambda a controller sets: lambda on CONTROLLED[weighting]'s tokens
    (Eq. 33's top third, Eq. 34's middle third, Eq. 35's A < 0), 1 elsewhere."""
    on = TOKEN_COMPONENTS[CONTROLLED[weighting]](adv, thirds, valid)
    return torch.full_like(adv, float(lam)).masked_fill(~on, 1.0), {"lambda": float(lam)}  # lambda in adv's dtype


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


def clipped_surrogate(new_logprobs, old_logprobs, advantages, cliprange: float,
                      cliprange_high: float | None = None) -> torch.Tensor:
    """Per-token PPO loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old (= Eq. 11's
    -CLIP_A(r) A; DAPO's clip-higher when eps_high > eps_low)."""
    high = cliprange if cliprange_high is None else cliprange_high
    ratio = torch.exp(new_logprobs - old_logprobs)
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high))


def kl_k3(new_logprobs, ref_logprobs) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - new) - (ref - new) - 1 (GRPO's loss term; >= 0)."""
    d = ref_logprobs - new_logprobs
    return torch.exp(d) - d - 1


def kl_k3_coefficient(new_logprobs, ref_logprobs) -> torch.Tensor:
    """d k3 / d log pi = 1 - exp(ref - new): the KL term's coefficient on grad log pi (the G analysis)."""
    return 1 - torch.exp(ref_logprobs - new_logprobs)


# How per-token losses become one batch loss (TRL GRPOTrainer's loss types), as per-token factors of `rows`:
#   token_mean  sum / tokens of these rows (PPO's, TRL "bnpo"; per micro-batch in training)
#   dapo        sum / tokens of the whole batch (`batch_tokens`: the optimizer step's mini-batch, all ranks)
#   grpo        per response: mean over its tokens; then mean over responses (TRL "grpo")
#   dr_grpo     sum / (responses x max_len) (TRL "dr_grpo": no length bias)
#   sequence_sum per response: sum over its tokens; mean over responses (RLOO's REINFORCE on log pi(y))
AGGREGATIONS = ("token_mean", "dapo", "grpo", "dr_grpo", "sequence_sum")


def aggregation_weights(valid: torch.Tensor, aggregation: str, *, max_len: int | None = None,
                        batch_tokens: float | None = None) -> torch.Tensor:
    """Per-token factor f such that the batch loss is sum_{i,t} f_it * loss_it over the rows of `valid` (0 on
    padding). One function for the trainer's loss and the G analysis's coefficients: linear in the per-token
    losses, independent of the component masks, so components stay additive."""
    v = valid.to(torch.float64 if not torch.is_floating_point(valid) else valid.dtype)
    rows = max(valid.shape[0], 1)
    if aggregation == "token_mean":
        return v / v.sum().clamp(min=1)
    if aggregation == "dapo":
        return v / (v.sum().clamp(min=1) if batch_tokens is None else max(float(batch_tokens), 1e-12))
    if aggregation == "grpo":
        return v / v.sum(1, keepdim=True).clamp(min=1) / rows
    if aggregation == "dr_grpo":
        return v / (rows * (max_len or valid.shape[1]))
    if aggregation == "sequence_sum":
        return v / rows
    raise ValueError(f"unknown loss aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}")


def policy_loss(per_token, weights, mask, valid, aggregation: str = "token_mean", *, max_len: int | None = None,
                batch_tokens: float | None = None, kl_term=None) -> torch.Tensor:
    """sum_t f_t (loss_t w_t m_t [+ kl_t]) with f from `aggregation_weights` (default: sum over the masked,
    weighted tokens / number of valid tokens): components add up to the whole."""
    f = aggregation_weights(valid, aggregation, max_len=max_len, batch_tokens=batch_tokens).to(per_token.dtype)
    body = per_token * weights * mask
    if kl_term is not None:
        body = body + kl_term
    return (body * f).sum()


def surrogate_loss(new_logprobs, old_logprobs, ref_logprobs, advantages, valid, weights, mask, a, *, kl_on: bool,
                   max_len: int | None = None, batch_tokens: float | None = None):
    """The objective's policy loss on a batch of responses: the weighted, masked clipped surrogate (eps_low,
    eps_high), plus kl_coef KL_k3 per token where the KL is in the loss and `kl_on`, aggregated by
    `a.loss_aggregation`. Returns (loss, per-token KL_k3 or None). The trainer's micro-batch loss."""
    low, high = clip_range(a)
    per_token = clipped_surrogate(new_logprobs, old_logprobs, advantages, low, high)
    kl = kl_k3(new_logprobs, ref_logprobs).masked_fill(~valid, 0.0) if a.kl_in == "loss" else None
    loss = policy_loss(per_token, weights, mask, valid, a.loss_aggregation, max_len=max_len,
                       batch_tokens=batch_tokens, kl_term=a.kl_coef * kl if kl_on and kl is not None else None)
    return loss, kl


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


def settings(algo, **overrides) -> CriticFreeAlgoConfig:
    """The algo section as its objective's schema, with that schema's defaults for the keys it lacks (hand-built
    configs; PPO's section lacks the critic-free keys: their defaults are PPO's behaviour), plus overrides."""
    spec = OBJECTIVES.get(algo["name"])
    schema = spec.schema if spec is not None and issubclass(spec.schema, CriticFreeAlgoConfig) \
        else CriticFreeAlgoConfig
    values = {k: algo[k] for k in schema.__dataclass_fields__ if k in algo}
    return schema(**{**values, **overrides})


def clip_range(a) -> tuple[float, float]:
    """(eps_low, eps_high): epsilon_low / epsilon_high where set, else cliprange."""
    low = a.cliprange if a.epsilon_low is None else a.epsilon_low
    return low, (a.cliprange if a.epsilon_high is None else a.epsilon_high)


def estimator(*, needs_critic: bool = False, needs_groups: bool = False, per_response: bool = False):
    """Marks an advantage estimator `fn(rollout, settings) -> rollout` with what the trainer must provide."""
    def wrap(fn):
        fn.needs_critic, fn.needs_groups, fn.per_response = needs_critic, needs_groups, per_response
        return fn
    return wrap


def needs_critic(algo) -> bool:
    return OBJECTIVES[algo.name].fn.needs_critic


def group_size(algo) -> int:
    """Responses per prompt in a rollout (1 for estimators without groups)."""
    return int(settings(algo).group_size) if OBJECTIVES[algo.name].fn.needs_groups else 1


def reward_kl(r, estimator_name: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate of the behaviour policy for the reward, 0 on padding."""
    log_ratio = r.ref_logprobs - r.logprobs
    kl = -log_ratio if estimator_name == "k1" else log_ratio.exp() - 1 - log_ratio
    return kl.masked_fill(~r.valid, 0.0)


def last_token_rewards(r, per_response: torch.Tensor) -> torch.Tensor:
    """A [B, Lr] reward holding each response's reward on its last valid token (the record `Rollout.rewards`)."""
    rewards = torch.zeros_like(r.logprobs)
    last = r.valid.long().sum(1).clamp(min=1) - 1
    rewards[torch.arange(len(last)), last] = per_response.to(rewards.dtype)
    return rewards.masked_fill(~r.valid, 0.0)


def per_response_advantages(r, advantages: torch.Tensor, response_rewards: torch.Tensor):
    """Fill a rollout with one advantage per response on every valid token; no values, no returns."""
    r.rewards = last_token_rewards(r, response_rewards)
    r.advantages = advantages[:, None].to(r.logprobs.dtype).expand_as(r.logprobs).masked_fill(~r.valid, 0.0)
    r.raw_advantages = r.advantages.clone()
    r.returns = torch.zeros_like(r.logprobs)
    return r


def grouped(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B] -> [B / k, k]: a rollout's rows are prompt-major (each prompt's k responses consecutive)."""
    if x.shape[0] % k:
        raise ValueError(f"a rollout of {x.shape[0]} responses is not whole groups of group_size={k}")
    return x.view(-1, k)


def group_normalised(scores: torch.Tensor, k: int, scale: bool) -> torch.Tensor:
    """GRPO's A_i = (r_i - mean_group r) / (std_group r + 1e-4) (unbiased std, TRL's epsilon); no std if not scale."""
    g = grouped(scores, k)
    centred = g - g.mean(1, keepdim=True)
    return (centred / (g.std(1, keepdim=True) + 1e-4) if scale else centred).flatten()


def drop_uniform_groups(r, k: int) -> int:
    """DAPO's dynamic sampling: groups whose scores are all equal carry no gradient; their responses leave the
    batch (no token of theirs is valid: in no component, normaliser or third). Returns how many were dropped."""
    g = grouped(r.scores, k)
    uniform = (g == g[:, :1]).all(1)
    r.valid &= ~uniform.repeat_interleave(k)[:, None]
    return int(uniform.sum())


@estimator(needs_critic=True)
def gae_advantages(r, a):
    """PPO: -kl_coef KL per token + score on the last token, GAE with the value model, whitened (`with_advantages`)."""
    return with_advantages(r, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, gamma=a.gamma, lam=a.gae_lambda,
                           whiten_rewards=a.whiten_rewards)


@estimator(needs_groups=True, per_response=True)
@torch.no_grad()
def grpo_advantages(r, a):
    """GRPO: A = (score - group mean) / group std on every token of the response; its KL is a loss term."""
    r.dropped_groups = drop_uniform_groups(r, a.group_size) if a.dynamic_sampling else 0
    return per_response_advantages(r, group_normalised(r.scores, a.group_size, a.scale_rewards), r.scores)


@estimator(needs_groups=True, per_response=True)
@torch.no_grad()
def rloo_advantages(r, a):
    """RLOO: reward = score - kl_coef sum_t KL_t (k1, in the reward), A_i = R_i - mean_{j != i} R_j in the group."""
    rewards = r.scores - a.kl_coef * reward_kl(r, a.kl_estimator).sum(1)
    g, k = grouped(rewards, a.group_size), a.group_size
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    r.dropped_groups = drop_uniform_groups(r, k) if a.dynamic_sampling else 0
    return per_response_advantages(r, (g - baseline).flatten(), rewards)


@estimator()
@torch.no_grad()
def reinforce_pp_advantages(r, a):
    """REINFORCE++: per-token reward -kl_coef KL_t (+ score on the last token), return to go (gamma = 1),
    whitened over every valid token of the batch; no critic."""
    rewards = (-a.kl_coef * reward_kl(r, a.kl_estimator)) + last_token_rewards(r, r.scores)
    returns = rewards.flip(1).cumsum(1).flip(1).masked_fill(~r.valid, 0.0)
    r.rewards, r.raw_advantages, r.returns = rewards, returns, returns.clone()
    r.advantages = whiten(returns, r.valid).masked_fill(~r.valid, 0.0)
    return r


# PPO and its paper variants share GAE with a value model; each has its weighting as its schema's default, so a
# label names the weighting only where a run changes it (GRPO with weighting=cppo_top).
@dataclass
class CPPOTopConfig(PPOAlgoConfig):
    name: str = "cppo"
    weighting: str = "cppo_top"


@dataclass
class CPPOMidConfig(PPOAlgoConfig):
    name: str = "cppo_mid"
    weighting: str = "cppo_mid"


@dataclass
class HPPOConfig(PPOAlgoConfig):
    name: str = "hppo"
    weighting: str = "hppo"


for _name, _schema, _label, _row in (("ppo", PPOAlgoConfig, "PPO", "PPO"), ("cppo", CPPOTopConfig, "cPPO-top", "cPPO"),
                                     ("cppo_mid", CPPOMidConfig, "cPPO-mid", "cPPO"), ("hppo", HPPOConfig, "hPPO", "hPPO")):
    register_objective(_name, family="ppo", schema=_schema, label=_label, table1_row=_row)(gae_advantages)
# Critic-free estimators: every weighting (algo.weighting=cppo_top, hppo, ...) applies to them too.
register_objective("grpo", family="ppo", schema=GRPOAlgoConfig, label="GRPO",
                   extra_components=("KL",))(grpo_advantages)
register_objective("dapo", family="ppo", schema=DAPOAlgoConfig, label="DAPO")(grpo_advantages)
register_objective("rloo", family="ppo", schema=RLOOAlgoConfig, label="RLOO")(rloo_advantages)
register_objective("reinforce_pp", family="ppo", schema=ReinforcePPAlgoConfig,
                   label="REINFORCE++")(reinforce_pp_advantages)
