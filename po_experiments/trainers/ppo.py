"""`ComponentPPOTrainer`: TRL's experimental PPOTrainer with its update loop written as separate stages.

TRL keeps the setup (policy + value wrapper, reference model, optimizer, scheduler, accelerator, callbacks,
logging); `train()` is ours: rollout -> score -> advantages -> PPO epochs of (policy loss + value loss), where the
policy loss is the clipped surrogate weighted per token by a registered weighting (ppo, cppo_top, cppo_mid,
hppo) and restricted to the active components (POS/NEG/TOP/MID/BOT minus what the ablation drops).

The advantages are the registered objective's estimator (objectives/policy_gradient.py): GAE with a value model
(PPO and its variants), or a critic-free one (GRPO, DAPO, RLOO, REINFORCE++), for which there is no value model at
all (no value forward, loss, optimizer state or checkpoint folder). Group estimators sample `algo.group_size`
responses per prompt: a rollout of `model.ppo.batch_size` rows holds batch_size / group_size prompts, each
group_size times in a row (whole groups on each process). The loss's aggregation is `algo.loss_aggregation`
(`aggregation_weights`, which the G analysis uses too); GRPO's KL(pi || ref) is a loss term (component KL).

Checkpoint `step-N` holds the policy and value model after N updates *and* the rollout they generate next
(D_N): exactly the pair (theta_t, D_t) the gradient-alignment analysis needs, and what a resumed run continues
from without regenerating, so it ends where an uninterrupted run ends.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from transformers import GenerationConfig, PretrainedConfig
from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

from ..atomic import replace_dir, write_json
from .ablations import ABLATIONS
from ..objectives import objective_of
from ..objectives.policy_gradient import (
    TOKEN_COMPONENTS, WEIGHTINGS, aggregation_weights, clip_range, controlled_weights, kl_active, settings,
    surrogate_loss, thirds_of, token_mask,
)

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One rollout batch: everything the update (and the analysis) needs, on one device."""

    query_responses: torch.Tensor  # [B, Lq + Lr], left-padded queries, responses padded after their stop token
    attention_mask: torch.Tensor  # [B, Lq + Lr]
    context_length: int  # Lq
    logprobs: torch.Tensor  # [B, Lr] behaviour-policy log-probs of the response tokens
    ref_logprobs: torch.Tensor  # [B, Lr]
    values: torch.Tensor  # [B, Lr]
    valid: torch.Tensor  # [B, Lr] bool: response tokens up to and including the stop token
    scores: torch.Tensor  # [B] reward-model / gold score of each response
    rewards: torch.Tensor  # [B, Lr] -beta KL per token, + score on the last valid token
    raw_advantages: torch.Tensor  # [B, Lr] GAE before whitening
    advantages: torch.Tensor  # [B, Lr] whitened, 0 on padding
    returns: torch.Tensor  # [B, Lr]

    @property
    def responses(self) -> torch.Tensor:
        return self.query_responses[:, self.context_length:]

    def to(self, device) -> "Rollout":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollout(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})

    def save(self, path: Path) -> None:
        torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in asdict(self).items()}, path)

    @classmethod
    def load(cls, path: Path, device="cpu") -> "Rollout":
        return cls(**torch.load(path, map_location="cpu", weights_only=True)).to(device)


class _TextReward(torch.nn.Module):
    """TRL's constructor wants a reward *module*; scoring here is text-level through `RewardFunction`. Under
    DeepSpeed TRL wraps it in an inference engine, which needs a config and one (unused) parameter."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.unused = torch.nn.Parameter(torch.zeros(1), requires_grad=False)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 (log-softmax, ratios and GAE need it); fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t | ...) of the response tokens from the logits at the positions that predict them, [B, Lr, V]:
    upcast and divided by the sampling temperature, one micro-batch at a time (no full-vocab tensor outlives it)."""
    return selective_log_softmax(upcast(logits) / temperature, responses)


class PolicyValueModel(trl_ppo.PolicyAndValueWrapper):
    """TRL's policy + value wrapper (one module for `accelerator.prepare`), whose forward computes the policy's
    logits only at the response positions (`logits_to_keep`) and reads the value backbone's last hidden state
    instead of asking both models for every layer's hidden states. `value_model=None` (critic-free estimators:
    GRPO, DAPO, RLOO, REINFORCE++): the policy alone, no value forward, no value parameters to optimise."""

    def __init__(self, policy, value_model=None):
        if value_model is not None:
            super().__init__(policy, value_model)
            return
        torch.nn.Module.__init__(self)
        self.policy, self.value_model, self.critic_backbone = policy, None, None
        self.is_gradient_checkpointing = policy.is_gradient_checkpointing

    def forward(self, input_ids, attention_mask, response_length: int):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False, return_dict=True)
        values = None
        if self.value_model is not None:
            hidden = self.critic_backbone(**kwargs).last_hidden_state
            values = self.value_model.score(hidden[:, -response_length - 1:-1]).squeeze(-1)
        logits = self.policy(**kwargs, logits_to_keep=response_length + 1).logits[:, :-1]
        return logits, values

# ============================================================================================ the rollout stages
# Module functions, not trainer methods: the trainer's rollouts and the G analysis's sample (analysis/ppo_sample.py)
# are made by the same code.


@dataclass(frozen=True)
class Sampling:
    """How a rollout samples and evaluates its responses (the trainer's PPOConfig / `model.ppo` settings)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    pad_token_id: int
    stop_token_id: int | None
    generation_batch_size: int | None = None  # prompts per generate() call; None: all at once
    forward_batch_size: int | None = None  # rows per estimate forward; None: all at once


def sample_responses(policy, queries: torch.Tensor, query_mask: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Sampled response tokens [B, <= max_new_tokens]: temperature, nucleus top_p, no top-k, stop at the stop token."""
    generation = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=True, top_k=0, top_p=s.top_p,
                                  temperature=s.temperature, pad_token_id=s.pad_token_id, eos_token_id=s.stop_token_id,
                                  use_cache=True)
    sequences = policy.generate(input_ids=queries, attention_mask=query_mask, generation_config=generation)
    return sequences[:, queries.shape[1]:]


def response_mask(responses: torch.Tensor, stop_token_id: int | None) -> torch.Tensor:
    """True for response tokens up to and including the first stop token."""
    if stop_token_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_stop = (responses == stop_token_id).long()
    stops_before = is_stop.cumsum(1) - is_stop  # stop tokens strictly before this position
    return stops_before == 0


def sequence_logprobs(model, query_responses, attention_mask, context: int, temperature: float) -> torch.Tensor:
    response_length = query_responses.shape[1] - context
    out = model(input_ids=query_responses, attention_mask=attention_mask, use_cache=False,
                position_ids=position_ids(attention_mask), return_dict=True, logits_to_keep=response_length + 1)
    return response_logprobs(out.logits[:, :-1], query_responses[:, context:], temperature)


def forward_estimates(wrapper, ref_model, query_responses, attention_mask, response_length: int, s: Sampling):
    """Behaviour log-probs (raw logits / temperature: the policy's own distribution, as the update's forward
    computes it), reference log-probs and values, [B, Lr] each, in micro-batches. `wrapper`: a `PolicyValueModel`."""
    step = s.forward_batch_size or len(query_responses)
    parts = []
    for i in range(0, len(query_responses), step):
        ids, att = query_responses[i:i + step], attention_mask[i:i + step]
        logits, values = wrapper(ids, att, response_length)
        logprobs = response_logprobs(logits, ids[:, -response_length:], s.temperature)
        del logits
        ref = sequence_logprobs(ref_model, ids, att, ids.shape[1] - response_length, s.temperature)
        parts.append((logprobs, ref, torch.zeros_like(logprobs) if values is None else upcast(values)))
    return tuple(torch.cat(p) for p in zip(*parts))


@torch.no_grad()
def rollout_of(sample, wrapper, ref_model, queries: torch.Tensor, query_mask: torch.Tensor, s: Sampling) -> Rollout:
    """A rollout before scoring: `sample(queries, mask)` per chunk of `generation_batch_size` prompts, responses
    cut after their stop token, then `forward_estimates`. Scores, rewards and advantages are zeros here."""
    pad, device = s.pad_token_id, queries.device
    chunk = s.generation_batch_size or len(queries)
    parts = [sample(queries[i:i + chunk], query_mask[i:i + chunk]) for i in range(0, len(queries), chunk)]
    width = max(p.shape[1] for p in parts)  # chunks may stop at different lengths (padding is past a stop)
    responses = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in parts])
    valid = response_mask(responses, s.stop_token_id)
    responses = responses.masked_fill(~valid, pad)
    query_responses = torch.cat([queries, responses], 1)
    attention_mask = torch.cat([query_mask, valid.long()], 1)
    logprobs, ref_logprobs, values = forward_estimates(wrapper, ref_model, query_responses, attention_mask, width, s)
    zero = torch.zeros_like(logprobs)
    return Rollout(query_responses, attention_mask, queries.shape[1],
                   logprobs.masked_fill(~valid, 0.0), ref_logprobs.masked_fill(~valid, 0.0),
                   values.masked_fill(~valid, 0.0), valid,
                   scores=torch.zeros(len(queries), device=device, dtype=logprobs.dtype),
                   rewards=zero, raw_advantages=zero, advantages=zero, returns=zero)


@torch.no_grad()
def score_rollout(r: Rollout, tokenizer, reward) -> Rollout:
    """Each response's score by the run's reward (text level: `RewardFunction.score(prompts, responses)`)."""
    ctx = r.context_length
    # The prompt exactly as fed (padding dropped by the mask: for Pythia the pad token *is* EOS)
    prompts = [tokenizer.decode(q[m.bool()]) for q, m in zip(r.query_responses[:, :ctx], r.attention_mask[:, :ctx])]
    responses = tokenizer.batch_decode(r.responses, skip_special_tokens=True)
    r.scores = reward.score(prompts, responses).to(r.logprobs.device, r.logprobs.dtype)
    return r


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout from several (e.g. every rank's share): queries left-padded and responses right-padded to common
    widths (masked out, `valid` False), rows in the order given."""
    ctx = max(p.context_length for p in parts)
    width = max(p.valid.shape[1] for p in parts)
    pad = torch.nn.functional.pad

    def widen(p: Rollout) -> dict:
        left, right = ctx - p.context_length, width - p.valid.shape[1]
        q, qm = p.query_responses[:, :p.context_length], p.attention_mask[:, :p.context_length]
        out = {"query_responses": torch.cat([pad(q, (left, 0), value=pad_token_id),
                                             pad(p.responses, (0, right), value=pad_token_id)], 1),
               "attention_mask": torch.cat([pad(qm, (left, 0)), pad(p.attention_mask[:, p.context_length:],
                                                                   (0, right))], 1),
               "scores": p.scores, "valid": pad(p.valid, (0, right), value=False)}
        for f in fields(Rollout):
            if f.name not in out and f.name != "context_length":
                out[f.name] = pad(getattr(p, f.name), (0, right))
        return out

    rows = [widen(p) for p in parts]
    return Rollout(context_length=ctx, **{k: torch.cat([r[k] for r in rows]) for k in rows[0]})



@contextlib.contextmanager
def mixed_precision_for_accelerator(args, pure_low_precision: bool):
    """TRL's PPOTrainer builds its Accelerator without `mixed_precision`, so accelerate reads it from the
    environment: bf16/fp16 autocast over fp32 master weights when the run asks for it, none for pure low-precision
    weights (a GradScaler cannot unscale fp16 gradients)."""
    mode = "no" if pure_low_precision else "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    saved = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = mode
    try:
        yield
    finally:
        os.environ.pop("ACCELERATE_MIXED_PRECISION") if saved is None else \
            os.environ.__setitem__("ACCELERATE_MIXED_PRECISION", saved)


def checkpointing_requested(args) -> tuple[bool, dict]:
    """TrainingArguments' activation checkpointing switch and kwargs (transformers 5 renamed gradient_* to
    activation_*; TRL's PPOConfig defaults it to on), non-reentrant unless the kwargs say otherwise."""
    on = getattr(args, "activation_checkpointing", None)
    on = args.gradient_checkpointing if on is None else on
    extra = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
    return bool(on), {"use_reentrant": False, **extra}


def prepare_trainable(models, args, pure_low_precision: bool) -> None:
    """Policy and value model before the optimizer exists: fp32 master weights (AdamW states follow the
    parameters' dtype) unless pure low precision was asked for; activation checkpointing when the arguments ask
    for it, which `Trainer.train()` would enable and our own `train()` bypasses."""
    low = [m for m in models if next(m.parameters()).dtype in (torch.bfloat16, torch.float16)]
    if pure_low_precision:
        if low:
            dtype = next(low[0].parameters()).dtype
            log.warning("model.pure_low_precision=true: policy and value train with %s weights and %s AdamW states, "
                        "no fp32 master copy; small updates (lr 2e-6) are mostly rounded away", dtype, dtype)
    else:
        for m in low:
            m.float()
    on, kwargs = checkpointing_requested(args)
    if on:
        for m in models:
            enable = getattr(m, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers < 5.24
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            m.config.use_cache = False  # training forwards; generation asks for its cache explicitly


def enable_tf32() -> None:
    """TF32 matmuls for the fp32 parts (Ampere and later; a no-op elsewhere)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        torch.set_float32_matmul_precision("high")  # CUDA only: on a CPU "high" could mean bf16 passes


@contextlib.contextmanager
def deepspeed_for_accelerator(args, max_grad_norm: float | None):
    """TRL's PPOTrainer builds its own Accelerator, which takes DeepSpeed from the environment (as `accelerate
    launch --config_file` would set it), not from `args.deepspeed`: hand it the run's config there, with the
    values a Trainer would have filled in for "auto"."""
    if not args.deepspeed:
        yield
        return
    config = dict(args.deepspeed)
    world = args.world_size or 1
    config.update(train_micro_batch_size_per_gpu=args.per_device_train_batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                  train_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
                  gradient_clipping=max_grad_norm or 0.0,
                  bf16={"enabled": bool(args.bf16)}, fp16={"enabled": bool(args.fp16)})
    path = Path(args.output_dir) / "deepspeed_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    saved = {k: os.environ.get(k) for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE")}
    os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(path))
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def advantage_third_means(r: Rollout, thirds: torch.Tensor | None = None) -> dict[str, float]:
    """Fig. 3, "average (raw) advantages (instead of absolute advantages)" of the TOP / MID / BOT thirds of |A|:
    "raw" is signed as opposed to absolute, and the A of the paper's loss (and of its thirds and G) is the whitened
    one, so `adv/<third>` is the mean signed *whitened* A of the third; `adv_unwhitened/<third>`, the mean GAE
    before whitening over the same tokens, is an extra series (whitening shifts means, so signs can differ)."""
    from ..objectives.policy_gradient import token_thirds

    thirds = token_thirds(r.advantages, r.valid) if thirds is None else thirds
    m = {}
    for name, k in (("TOP", 2), ("MID", 1), ("BOT", 0)):
        sel = thirds == k
        m[f"adv/{name}"] = r.advantages[sel].mean().item() if sel.any() else 0.0
        m[f"adv_unwhitened/{name}"] = r.raw_advantages[sel].mean().item() if sel.any() else 0.0
    return m


class ComponentPPOTrainer(PPOTrainer):
    def __init__(self, *args, reward, algo, ablation, top_p: float = 1.0, max_grad_norm: float | None = 1.0,
                 checkpoint_root: Path | None = None, save_steps: int = 0, generation_batch_size: int | None = None,
                 pure_low_precision: bool = False, controller=None, **kwargs):
        if algo.weighting not in WEIGHTINGS:
            raise KeyError(f"unknown weighting {algo.weighting!r}; registered: {sorted(WEIGHTINGS)}")
        if generation_batch_size is not None and generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1 or None, got {generation_batch_size}")
        self.reward, self.algo, self.ablation = reward, algo, ablation
        self.controller = controller  # None: the weighting's own lambda (controllers/: controller=g_balance)
        self.weighting = WEIGHTINGS[algo.weighting]
        self.estimator = objective_of(algo).fn  # the advantage estimator (GAE, GRPO, RLOO, REINFORCE++)
        self.group_size = settings(algo).group_size if self.estimator.needs_groups else 1
        if not self.estimator.needs_critic:
            kwargs["value_model"] = None  # no value head forward, no value loss, no value optimizer state
        self.drop_components = ABLATIONS[ablation.name]
        self.top_p, self.max_grad_norm = top_p, max_grad_norm
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.save_every = save_steps
        self.generation_batch_size = generation_batch_size  # None: the whole per-device rollout batch at once
        train_args = kwargs["args"]
        prepare_trainable([m for m in (kwargs["model"], kwargs["value_model"]) if m is not None], train_args,
                          pure_low_precision)
        enable_tf32()
        with deepspeed_for_accelerator(train_args, max_grad_norm), \
                mixed_precision_for_accelerator(train_args, pure_low_precision), \
                mock.patch.object(trl_ppo, "PolicyAndValueWrapper", PolicyValueModel):
            super().__init__(*args, reward_model=_TextReward(), **kwargs)
        self.sampler = torch.Generator().manual_seed(self.args.seed)  # PPO minibatch shuffles, saved with checkpoints
        if self.args.local_batch_size % self.group_size:
            raise ValueError(f"model.ppo.batch_size counts responses: each process's {self.args.local_batch_size} "
                             f"must be whole groups of algo.group_size={self.group_size}")

    @property
    def pg(self):
        """The estimator's settings: the algo section, with the values TRL's PPOConfig carries taken from it (the
        stage sets both alike)."""
        a = self.args
        return settings(self.algo, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, gamma=a.gamma, gae_lambda=a.lam,
                        whiten_rewards=a.whiten_rewards, cliprange=a.cliprange)

    @property
    def prompts_per_update(self) -> int:
        """Prompts of one update over all processes: model.ppo.batch_size counts responses, group_size per prompt."""
        return self.args.batch_size // self.group_size

    # ========================================================================================= data order
    def batch_for(self, update: int) -> dict:
        """This process's prompts of update `update` (1-based): epoch-wise permutations seeded by (seed, epoch), so a
        resumed run finds its place without replaying the data loader; process r takes the r-th slice of the
        update's global batch."""
        k = self.group_size
        n, b, total = len(self.train_dataset), self.args.local_batch_size // k, self.prompts_per_update
        per_epoch = n // total
        epoch, index = divmod(update - 1, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + epoch))
        start = index * total + self.accelerator.process_index * b
        rows = [self.train_dataset[int(i)] for i in order[start:start + b] for _ in range(k)]  # groups: k in a row
        return self.data_collator([{"input_ids": r["input_ids"]} for r in rows])

    # ========================================================================================= 1. rollout
    @property
    def sampling(self) -> "Sampling":
        args = self.args
        return Sampling(max_new_tokens=args.response_length, temperature=args.temperature, top_p=self.top_p,
                        pad_token_id=self.processing_class.pad_token_id, stop_token_id=self.stop_token_id,
                        generation_batch_size=self.generation_batch_size,
                        forward_batch_size=args.local_rollout_forward_batch_size)

    @torch.no_grad()
    def rollout(self, batch: dict) -> Rollout:
        """Sample responses in chunks of `generation_batch_size` prompts (tokens only), then behaviour, reference
        and value estimates of every response token with forward passes in micro-batches of
        `local_rollout_forward_batch_size` (memory at billion-parameter scale): `rollout_of`, which the G
        analysis's sample goes through too."""
        device = self.accelerator.device
        self.model.eval()  # under activation checkpointing a module in train mode refuses generate's KV cache
        with self.accelerator.autocast():
            return rollout_of(self.sample, self.accelerator.unwrap_model(self.model), self.ref_model,
                              batch["input_ids"].to(device), batch["attention_mask"].to(device), self.sampling)

    def sample(self, queries: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Sampled response tokens [B, <= response_length] (generate keeps no logits: those come from a forward).
        Under ZeRO-3 the policy's parameters are gathered for the call (`ds3_gather_for_generation`), or else
        generate runs with the ranks in lockstep (transformers' synced_gpus)."""
        with unwrap_model_for_generation(self.model, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as wrapper:
            return sample_responses(wrapper.policy, queries, query_mask, self.sampling)

    def forward_estimates(self, query_responses, attention_mask, response_length: int):
        return forward_estimates(self.accelerator.unwrap_model(self.model), self.ref_model, query_responses,
                                 attention_mask, response_length, self.sampling)

    def response_mask(self, responses: torch.Tensor) -> torch.Tensor:
        return response_mask(responses, self.stop_token_id)

    def sequence_logprobs(self, model, query_responses, attention_mask, context) -> torch.Tensor:
        return sequence_logprobs(model, query_responses, attention_mask, context, self.args.temperature)

    # ========================================================================================= 2. score
    @torch.no_grad()
    def score(self, r: Rollout) -> Rollout:
        return score_rollout(r, self.processing_class, self.reward)

    # ========================================================================================= 3. advantages
    @torch.no_grad()
    def advantages(self, r: Rollout) -> Rollout:
        """The objective's estimator on this process's rollout (GAE + whitening, group-normalised, ...)."""
        return self.estimator(r, self.pg)

    def make_rollout(self, batch: dict) -> Rollout:
        return self.advantages(self.score(self.rollout(batch)))

    # ========================================================================================= 4-5. losses
    def token_weights(self, r: Rollout, step: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Per-token weight (the variant) and 0/1 mask (the active components) for this rollout at step t."""
        thirds = thirds_of(r.advantages, r.valid, self.algo)
        if self.controller is not None:  # the controller's lambda on the weighting's own tokens
            weights, scalars = controlled_weights(r.advantages, thirds, r.valid, self.algo.weighting,
                                                  self.controller.lam)
        else:
            weights, scalars = self.weighting(r.advantages, thirds, step, self.algo)
        mask = token_mask(self.algo.components, self.drop_components(step, self.ablation), r.advantages, thirds,
                          r.valid)
        return weights, mask, scalars

    def kl_on(self, step: int) -> bool:
        """Whether the objective's KL-in-the-loss term (GRPO) is trained at step t (component KL, part of TOT)."""
        return self.pg.kl_in == "loss" and kl_active(self.algo.components, self.drop_components(step, self.ablation))

    def micro_batch_losses(self, r: Rollout, idx, weights, mask, *, kl_on: bool | None = None,
                           batch_tokens: float | None = None) -> dict[str, torch.Tensor]:
        """Policy loss (weighted clipped surrogate, + kl_coef KL_k3 per token where the KL is in the loss),
        aggregated by `algo.loss_aggregation`, and the clipped value loss (critic estimators only) on the rows `idx`.
        `batch_tokens`: the "dapo" aggregation's denominator (this micro-batch's share of the optimizer step's)."""
        args, a = self.args, self.pg
        ids, att = r.query_responses[idx], r.attention_mask[idx]
        length = ids.shape[1] - r.context_length
        logits, vpred = self.model(ids, att, length)
        new_logprobs = response_logprobs(logits, ids[:, -length:], args.temperature)
        del logits
        valid = r.valid[idx]
        pg_loss, kl = surrogate_loss(new_logprobs, r.logprobs[idx], r.ref_logprobs[idx], r.advantages[idx], valid,
                                     weights[idx], mask[idx], a, kl_on=self.kl_on(0) if kl_on is None else kl_on,
                                     max_len=args.response_length, batch_tokens=batch_tokens)
        low, high = clip_range(a)
        n_valid = valid.sum().clamp(min=1)
        if vpred is not None:
            vpred = upcast(vpred)
            vclipped = r.values[idx] + (vpred - r.values[idx]).clamp(-args.cliprange_value, args.cliprange_value)
            vf = torch.max((vpred - r.returns[idx]) ** 2, (vclipped - r.returns[idx]) ** 2)
            vf_loss = 0.5 * (vf * valid).sum() / n_valid
        else:
            vf_loss = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
        with torch.no_grad():
            ratio = torch.exp(new_logprobs - r.logprobs[idx])
            clipped = ((ratio < 1 - low) | (ratio > 1 + high)) & valid
            stats = {"clipfrac": clipped.float().sum() / n_valid,
                     "approxkl": 0.5 * (((new_logprobs - r.logprobs[idx]) ** 2) * valid).sum() / n_valid,
                     "ratio": (ratio * valid).sum() / n_valid}
            if kl is not None:
                stats["kl_k3"] = (kl * valid).sum() / n_valid
        return {"loss": pg_loss + args.vf_coef * vf_loss, "policy": pg_loss, "value": vf_loss, **stats}

    def step_tokens(self, r: Rollout, rows: torch.Tensor, micro_batches: int) -> float | None:
        """The "dapo" aggregation's denominator per micro-batch: the optimizer step's valid tokens over all
        processes / processes (DDP averages gradients over them) / micro-batches (accelerate divides each
        micro-batch's loss by the accumulation steps, so the step's gradient is sum over tokens / tokens)."""
        if self.pg.loss_aggregation != "dapo":
            return None
        tokens = self.accelerator.reduce(r.valid[rows].sum().to(torch.float64), "sum").item()
        return tokens / self.accelerator.num_processes / micro_batches

    # ========================================================================================= the controller
    def component_losses(self, r: Rollout, idx, names) -> dict[str, torch.Tensor]:
        """Per component (POS, NEG, TOP, MID or REST = the tokens not in the other one), a scalar whose gradient is
        its unscheduled policy-loss gradient on rows `idx` at the rollout's policy (ratio 1, inside the clip):
        the aggregated sum of -A_t grad log pi_t over its tokens (weight 1: measurable while lambda is 0)."""
        ids, att = r.query_responses[idx], r.attention_mask[idx]
        length = ids.shape[1] - r.context_length
        logits, _ = self.model(ids, att, length)
        new_logprobs = response_logprobs(logits, ids[:, -length:], self.args.temperature)
        adv, valid = r.advantages[idx], r.valid[idx]
        thirds = thirds_of(r.advantages, r.valid, self.algo)[idx]  # ranked over the rollout, as the update ranks
        f = aggregation_weights(valid, self.pg.loss_aggregation, max_len=self.args.response_length).to(adv.dtype)
        masks = {n: TOKEN_COMPONENTS[n](adv, thirds, valid) for n in names if n != "REST"}
        if "REST" in names:
            masks["REST"] = valid & ~next(iter(masks.values()))
        return {n: (f * -adv * m.to(adv.dtype) * new_logprobs).sum() for n, m in masks.items()}

    def controller_step(self, r: Rollout, step: int) -> dict[str, float]:
        """At the controller's due updates: G of its two components on the first micro-batch of this rollout, then
        its lambda moves (used by this update's weights); the row's numbers for the log."""
        c = self.controller
        idx = torch.arange(min(self.args.per_device_train_batch_size, r.valid.shape[0]), device=r.valid.device)
        policy = self.accelerator.unwrap_model(self.model).policy
        row = c.measure(policy, lambda: self.component_losses(r, idx, (c.reference, c.controlled)), step,
                        self.state.max_steps)
        out = {"controller/lambda": c.lam}
        if row is not None:
            out.update({f"controller/{k}": row[k] for k in row if k.startswith("G_") or k in ("lambda_target", "seconds")})
        return out

    # ========================================================================================= the update
    def update(self, r: Rollout, step: int) -> dict[str, float]:
        """num_ppo_epochs passes over the rollout in shuffled minibatches (gradient accumulation over micro-batches)."""
        args = self.args
        controlled = self.controller_step(r, step) if self.controller is not None else {}
        weights, mask, scalars = self.token_weights(r, step)
        scalars = {**scalars, **controlled}
        kl_on = self.kl_on(step)
        sums: dict[str, float] = {}
        count = 0
        if self.accelerator.reduce(r.valid.sum().to(torch.float64), "sum").item() == 0:
            # dynamic sampling dropped every group on every process: nothing to learn from, no optimizer step
            # (AdamW would still move the weights on zero gradients); the update still counts
            log.warning("update %d: every group of the rollout has equal scores; skipped", step + 1)
            return {"ppo/skipped": 1.0, **scalars}
        self.model.train()
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(args.local_batch_size, generator=self.sampler)
            for mb_start in range(0, args.local_batch_size, args.local_mini_batch_size):
                minibatch = order[mb_start:mb_start + args.local_mini_batch_size]
                micro = -(-len(minibatch) // args.per_device_train_batch_size)
                tokens = self.step_tokens(r, minibatch.to(r.valid.device), micro)
                for mc_start in range(0, len(minibatch), args.per_device_train_batch_size):
                    idx = minibatch[mc_start:mc_start + args.per_device_train_batch_size].to(r.logprobs.device)
                    with self.accelerator.accumulate(self.model):
                        losses = self.micro_batch_losses(r, idx, weights, mask, kl_on=kl_on, batch_tokens=tokens)
                        self.accelerator.backward(losses["loss"])
                        if self.accelerator.sync_gradients and self.max_grad_norm:
                            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    count += 1
        return {**{f"ppo/{k}": v / count for k, v in sums.items()}, "ppo/skipped": 0.0, **scalars}

    def rollout_metrics(self, r: Rollout) -> dict[str, float]:
        """Fig. 3's series and the share of tokens in POS / NEG (`advantage_third_means`)."""
        m = {"objective/scores": r.scores.mean().item(),
             "objective/kl": ((r.logprobs - r.ref_logprobs) * r.valid).sum(1).mean().item(),
             "objective/response_length": r.valid.float().sum(1).mean().item(),
             "tokens/pos_share": (r.valid & (r.advantages >= 0)).sum().item() / max(r.valid.sum().item(), 1),
             "tokens/neg_share": (r.valid & (r.advantages < 0)).sum().item() / max(r.valid.sum().item(), 1)}
        if self.pg.dynamic_sampling:
            m["dynamic_sampling/dropped_groups"] = float(getattr(r, "dropped_groups", 0))
        return {**m, **advantage_third_means(r, thirds_of(r.advantages, r.valid, self.algo))}

    # ========================================================================================= App. A's loss record
    def checks_loss(self, step: int) -> bool:
        """Update step+1 follows checkpoint step-`step`: record the loss before and after it (the same decision on
        every rank: the forwards are collective under DeepSpeed)."""
        return self.checkpoint_root is not None and bool(self.save_every) and step > 0 and step % self.save_every == 0

    @torch.no_grad()
    def policy_objective(self, r: Rollout, step: int) -> float:
        """The training objective on rollout `r` at the current weights: the weighted clipped-surrogate policy loss
        with update step+1's weights and mask, the mean over this process's micro-batches (in index order) and over
        the processes. At the rollout's own policy the ratio is 1: the loss the update's first pass computes."""
        weights, mask, _ = self.token_weights(r, step)
        self.model.eval()
        n, size = r.valid.shape[0], self.args.per_device_train_batch_size
        starts = range(0, n, size)
        tokens = self.step_tokens(r, torch.arange(n, device=r.valid.device), len(starts))
        losses = [self.micro_batch_losses(r, torch.arange(i, min(i + size, n), device=r.valid.device), weights,
                                          mask, kl_on=self.kl_on(step), batch_tokens=tokens)["policy"]
                  for i in starts]
        return self.accelerator.reduce(torch.stack(losses).mean(), "mean").item()

    def write_loss_check(self, step: int, before: float, after: float) -> None:
        """checkpoints/step-N/loss_check.json (App. A's filter): the objective on update N+1's rollout at theta_N and,
        after that update's PPO epochs, at theta_N+1. Written atomically by rank 0."""
        folder = self.checkpoint_root / f"step-{step}"
        if not self.accelerator.is_main_process or not folder.is_dir():
            return
        record = {"before": before, "after": after,
                  "measured_on": f"PPO policy loss on the rollout of update {step + 1} ({self.args.batch_size} "
                                 "responses), before and after that update"}
        write_json(folder / "loss_check.json", record, indent=2)

    # ========================================================================================= loop
    def train(self, resume_from: Path | None = None) -> None:
        args = self.args
        total = args.num_total_batches
        self.state.max_steps = total
        self.state.logging_steps = args.logging_steps
        start, pending = (self.restore(resume_from) if resume_from else (0, None))
        self.state.global_step = start
        self.state.episode = start * args.batch_size
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        for update in range(start + 1, total + 1):
            step = update - 1  # updates completed so far: the paper's t
            rollout = pending if pending is not None else self.make_rollout(self.batch_for(update))
            if pending is None and self.save_every and step > 0 and step % self.save_every == 0:
                self.save_step(step, rollout)
            pending = None
            checked = self.checks_loss(step)
            before = self.policy_objective(rollout, step) if checked else None
            metrics = {**self.rollout_metrics(rollout), **self.update(rollout, step)}
            metrics.setdefault("ppo/loss", float("nan"))  # a skipped update (dynamic sampling dropped everything)
            if checked:
                self.write_loss_check(step, before, self.policy_objective(rollout, step))
            self.state.global_step = update
            self.state.episode = update * args.batch_size
            self.state.epoch = update * self.prompts_per_update / len(self.train_dataset)
            metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
            self.lr_scheduler.step()
            if update % max(1, args.logging_steps) == 0 or update == total:
                self.log({"loss": metrics["ppo/loss"], **metrics})
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self.checkpoint_root is not None and total not in self.saved_steps():
            self.save_step(total, self.make_rollout(self.batch_for(total + 1)))
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)

    # ========================================================================================= checkpoints
    def saved_steps(self) -> set[int]:
        from ..checkpoints import step_dirs

        return set(step_dirs(self.checkpoint_root)) if self.checkpoint_root else set()

    def _rank_file(self, name: str) -> str:
        """Per-process files of a checkpoint: rank 0 keeps the plain name (the G analysis reads its rollout)."""
        rank = self.accelerator.process_index
        stem, dot, ext = name.partition(".")
        return name if rank == 0 else f"{stem}-rank{rank}{dot}{ext}"

    @property
    def is_zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3

    def whole_state_dicts(self) -> dict[str, dict | None]:
        """Policy and value weights as `save_pretrained(state_dict=...)` takes them. Collective: under ZeRO-3 the
        partitions are gathered into 16-bit weights on rank 0 (the other ranks get empty dicts); elsewhere None (each
        module's own, whole weights)."""
        if not self.is_zero3:
            return {"policy": None, "value_model": None}
        full = self.accelerator.get_state_dict(self.model) or {}  # every rank must call it; None off rank 0
        return {part: {k[len(part) + 1:]: v for k, v in full.items() if k.startswith(part + ".")}
                for part in ("policy", "value_model")}  # value_model: empty without a critic (never saved)

    def save_policy(self, folder: Path) -> None:
        """The trained policy as a plain transformers folder; called on every rank (ZeRO-3 gathers), rank 0 writes."""
        states = self.whole_state_dicts()
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.model).policy.save_pretrained(folder, state_dict=states["policy"])

    def save_step(self, step: int, rollout: Rollout) -> None:
        """Write checkpoints/step-N atomically: policy, value model, rollout D_N, optimizer, scheduler, RNG.
        Every process writes its rollout share and RNG (and, under DeepSpeed, its optimizer partition)."""
        if self.checkpoint_root is None:
            return
        main, sync = self.accelerator.is_main_process, self.accelerator.wait_for_everyone
        target = self.checkpoint_root / f"step-{step}"
        tmp = target.with_name(target.name + ".tmp")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        sync()
        if self.is_deepspeed_enabled:
            self.model.save_checkpoint(str(tmp / "deepspeed"))  # collective: each rank its ZeRO partition
        rollout.save(tmp / self._rank_file("rollout.pt"))
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "sampler": self.sampler.get_state()}, tmp / self._rank_file("rng_state.pth"))
        states = self.whole_state_dicts()
        sync()
        if main:
            self._save_main(tmp, target, step, rollout, states)
        sync()

    def _save_main(self, tmp: Path, target: Path, step: int, rollout: Rollout, states: dict) -> None:
        wrapper = self.accelerator.unwrap_model(self.model)
        wrapper.policy.save_pretrained(tmp, state_dict=states["policy"])
        self.processing_class.save_pretrained(tmp)
        if wrapper.value_model is not None:  # critic-free estimators have none
            wrapper.value_model.save_pretrained(tmp / "value", state_dict=states["value_model"])
        if not self.is_deepspeed_enabled:
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
        self.state.save_to_json(str(tmp / "trainer_state.json"))
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        record = {"step": step, "loss": losses[-1] if losses else None, "epoch": self.state.epoch,
                  "mean_score": rollout.scores.mean().item()}
        (tmp / "record.json").write_text(json.dumps(record, indent=2))
        if self.controller is not None:
            self.controller.save(tmp)
        replace_dir(tmp, target)

    def restore(self, folder: Path) -> tuple[int, Rollout]:
        """Load step-N: weights (through from_pretrained's name mapping, strictly), optimizer, scheduler, RNG.
        Under DeepSpeed the engine's own checkpoint restores weights and optimizer partitions together."""
        if self.is_deepspeed_enabled:
            self.model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=True, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        else:
            wrapper = self.accelerator.unwrap_model(self.model)
            for module, path in ((wrapper.policy, folder), (wrapper.value_model, folder / "value")):
                if module is None:
                    continue
                loaded = type(module).from_pretrained(path, dtype=next(module.parameters()).dtype)
                module.load_state_dict(loaded.state_dict(), strict=True)
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
        rng = torch.load(folder / self._rank_file("rng_state.pth"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.sampler.set_state(rng["sampler"])
        state = json.loads((folder / "trainer_state.json").read_text())
        self.state.log_history = state.get("log_history", [])
        step = int(json.loads((folder / "record.json").read_text())["step"])
        log.info("resumed PPO at step %d from %s", step, folder)
        return step, Rollout.load(folder / self._rank_file("rollout.pt"), self.accelerator.device)
