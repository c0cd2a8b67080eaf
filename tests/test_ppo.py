"""The PPO family's formulas (Eq. 11-16, 33-35), GAE, and checkpoints that carry their rollout."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from po_experiments.trainers.objectives import MID, TOP
from po_experiments.trainers.ppo import Rollout
from po_experiments.trainers.ppo_objectives import (
    TOKEN_COMPONENTS, WEIGHTINGS, gae, hppo_lambda, token_mask, token_thirds,
)

from conftest import PPO_ALGO as ALGO


def random_batch(seed=0, rows=6, length=9):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(rows, length, generator=g, dtype=torch.float64)
    valid = torch.rand(rows, length, generator=g) < 0.8
    valid[:, 0] = True
    return adv.masked_fill(~valid, 0.0), valid


# ------------------------------------------------------------------------------------------ masks and weights


def test_masks_partition_the_valid_tokens():
    adv, valid = random_batch()
    thirds = token_thirds(adv, valid)
    pos, neg = TOKEN_COMPONENTS["POS"](adv, thirds, valid), TOKEN_COMPONENTS["NEG"](adv, thirds, valid)
    assert torch.equal(pos | neg, valid) and not (pos & neg).any()
    parts = [TOKEN_COMPONENTS[c](adv, thirds, valid) for c in ("TOP", "MID", "BOT")]
    assert torch.equal(parts[0] | parts[1] | parts[2], valid)
    assert sum(p.long() for p in parts).max() == 1
    counts = torch.stack([p.sum() for p in parts])
    assert counts.max() - counts.min() <= 1  # thirds by rank
    assert (adv.abs()[parts[0]].min() >= adv.abs()[parts[1]].max()) and \
        (adv.abs()[parts[1]].min() >= adv.abs()[parts[2]].max())


def test_thirds_with_tied_advantages_are_never_empty():
    adv, valid = torch.zeros(4, 5), torch.ones(4, 5, dtype=torch.bool)
    counts = torch.bincount(token_thirds(adv, valid).flatten(), minlength=3)
    assert (counts > 0).all() and counts.max() - counts.min() <= 1


def test_ablation_masks_remove_a_third():
    adv, valid = random_batch(1)
    thirds = token_thirds(adv, valid)
    wo_top = token_mask(["TOT"], ["TOP"], adv, thirds, valid)
    assert torch.equal(wo_top.bool(), valid & (thirds != TOP))


@pytest.mark.parametrize("name,lam,third", [("cppo_top", 0.3, TOP), ("cppo_mid", 0.7, MID)])
def test_cppo_weights_match_eq_33_34(name, lam, third):
    adv, valid = random_batch(2)
    thirds = token_thirds(adv, valid)
    weights, scalars = WEIGHTINGS[name](adv, thirds, 5, OmegaConf.create({**ALGO, "lam": lam}))
    assert torch.allclose(weights[thirds == third], torch.tensor(lam, dtype=weights.dtype))
    assert torch.all(weights[(thirds != third)] == 1.0) and scalars["lambda"] == lam


@pytest.mark.parametrize("step,expected", [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1 - 0.08), (2.5, 1 - 0.08),
                                           (2.02, 1 + math.sin(math.pi * 2.02 / 2)), (4, 1.0), (5, 1.0)])
def test_hppo_lambda_matches_eq_35(step, expected):
    assert hppo_lambda(step, t3=2, tau=0.08) == pytest.approx(expected)


def test_hppo_weights_only_negative_advantages():
    adv, valid = random_batch(3)
    thirds = token_thirds(adv, valid)
    weights, scalars = WEIGHTINGS["hppo"](adv, thirds, 3, OmegaConf.create({**ALGO, "t3": 2, "tau": 0.05}))
    assert scalars["lambda"] == pytest.approx(0.95)
    assert torch.allclose(weights[adv < 0], torch.tensor(0.95, dtype=weights.dtype))
    assert torch.all(weights[adv >= 0] == 1.0) and (adv < 0).any()


# ------------------------------------------------------------------------------------------ GAE, surrogate


def test_gae_equals_the_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g,
                                                                                      dtype=torch.float64)
    gamma, lam = 0.97, 0.9
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    delta = rewards + gamma * next_values - values
    brute = torch.stack([sum((gamma * lam) ** (k - t) * delta[:, k] for k in range(t, 7)) for t in range(7)], dim=1)
    assert torch.allclose(gae(rewards, values, gamma, lam), brute, atol=1e-12)


def literal_eq11(new, old, adv, valid, eps):
    """Eq. 11 written out token by token: -CLIP_A(r) A, CLIP_a(x) = min(x, 1+eps) if a >= 0 else max(x, 1-eps)."""
    total, count = 0.0, 0
    for i in range(len(new)):
        for t in range(len(new[0])):
            if not valid[i][t]:
                continue
            r = math.exp(new[i][t] - old[i][t])
            a = adv[i][t]
            clipped = min(r, 1 + eps) if a >= 0 else max(r, 1 - eps)
            total += -clipped * a
            count += 1
    return total / count


# ------------------------------------------------------------------------------------------ the trainer


def whole_batch_policy_loss(trainer, r: Rollout, step=0, components=None):
    if components is not None:
        trainer.algo.components = components
    weights, mask, _ = trainer.token_weights(r, step)
    idx = torch.arange(r.valid.shape[0])
    return trainer.micro_batch_losses(r, idx, weights, mask)["policy"]


def perturbed(trainer):
    """Move the policy off the behaviour policy, so ratios differ from 1 and clipping bites."""
    with torch.no_grad():
        for p in trainer.accelerator.unwrap_model(trainer.model).policy.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_rollout_is_well_formed(ppo):
    trainer = ppo()
    r = trainer.make_rollout(trainer.batch_for(1))
    assert r.valid.any(1).all() and r.scores.shape == (16,)
    ends = r.valid.long().sum(1) - 1
    stops = r.responses[torch.arange(16), ends]
    finished = r.valid.long().sum(1) < r.responses.shape[1]
    assert torch.all(stops[finished] == trainer.processing_class.eos_token_id)  # valid up to and incl. the stop
    assert torch.allclose(r.advantages[r.valid].mean(), torch.tensor(0.0, dtype=r.advantages.dtype), atol=1e-6)


def test_all_weights_one_equals_literal_eq11(ppo):
    trainer = ppo()
    r = trainer.make_rollout(trainer.batch_for(1))
    perturbed(trainer)
    ours = whole_batch_policy_loss(trainer, r).item()
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    new = trainer.sequence_logprobs(policy, r.query_responses, r.attention_mask, r.context_length).detach()
    reference = literal_eq11(new.tolist(), r.logprobs.tolist(), r.advantages.tolist(), r.valid.tolist(),
                             trainer.args.cliprange)
    assert ours == pytest.approx(reference, rel=1e-10)
    clip_fraction = ((torch.exp(new - r.logprobs) - 1).abs() > trainer.args.cliprange)[r.valid].float().mean()
    assert clip_fraction > 0.05  # the comparison exercised the clipped branch


def test_component_losses_and_gradients_add_up(ppo):
    trainer = ppo()
    r = trainer.make_rollout(trainer.batch_for(1))
    perturbed(trainer)
    params = list(trainer.accelerator.unwrap_model(trainer.model).policy.parameters())
    results = {}
    for comp in ("TOT", "POS", "NEG", "TOP", "MID", "BOT"):
        loss = whole_batch_policy_loss(trainer, r, components=[comp])
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=True)
                          if g is not None])
        results[comp] = (loss.detach(), grad)
    tot_loss, tot_grad = results["TOT"]
    for parts in (("POS", "NEG"), ("TOP", "MID", "BOT")):
        assert sum(results[c][0] for c in parts) == pytest.approx(tot_loss.item(), rel=1e-10)
        assert torch.allclose(sum(results[c][1] for c in parts), tot_grad, rtol=1e-8, atol=1e-12)
    assert all((results[c][1] - tot_grad).norm() > 1e-6 for c in ("POS", "NEG", "TOP", "MID", "BOT"))


def test_cppo_top_at_lambda_one_is_ppo_and_at_zero_drops_the_top_third(ppo):
    trainer = ppo(algo={"weighting": "cppo_top", "lam": 1.0})
    r = trainer.make_rollout(trainer.batch_for(1))
    perturbed(trainer)
    full = whole_batch_policy_loss(trainer, r).item()
    trainer.algo.lam = 0.0
    no_top = whole_batch_policy_loss(trainer, r).item()
    trainer.algo.lam, trainer.algo.weighting = 1.0, "ppo"
    wo_top = whole_batch_policy_loss(trainer, r, components=["MID", "BOT"]).item()
    assert no_top == pytest.approx(wo_top, rel=1e-12) and abs(full - no_top) > 1e-6


def test_saved_rollout_reloads_and_reproduces_the_loss(ppo, tmp_path):
    trainer = ppo(save_steps=1)
    r = trainer.make_rollout(trainer.batch_for(1))
    trainer.update(r, step=0)
    r2 = trainer.make_rollout(trainer.batch_for(2))
    trainer.save_step(1, r2)
    expected = whole_batch_policy_loss(trainer, r2, step=1).item()

    fresh = ppo()  # SFT weights again, then the checkpoint
    step, reloaded = fresh.restore(tmp_path / "checkpoints" / "step-1")
    assert step == 1
    assert whole_batch_policy_loss(fresh, reloaded, step=1).item() == pytest.approx(expected, rel=1e-12)
    assert torch.equal(reloaded.query_responses, r2.query_responses)


def test_resumed_training_matches_uninterrupted(ppo, tmp_path):
    straight = ppo()
    straight.train()
    weights = {k: v.clone() for k, v in straight.accelerator.unwrap_model(straight.model).policy.state_dict().items()}

    first = ppo(save_steps=1)
    first.args.num_total_batches = 1  # stop after one update, as a killed run would; step-1 holds D_1
    first.train()
    resumed = ppo(save_steps=1)
    resumed.train(resume_from=tmp_path / "checkpoints" / "step-1")
    again = resumed.accelerator.unwrap_model(resumed.model).policy.state_dict()
    assert all(torch.allclose(weights[k], again[k], atol=1e-10) for k in weights)


def test_ppo_prompts_from_paper_data_are_token_ids_with_their_turns(tokenizer, tmp_path):
    """The real-data path: UltraFeedback rows -> chat-templated prompt ids (capped) + a text -> turns lookup."""
    import json as _json

    from po_experiments.config import PaperDataConfig, PPOHparams
    from po_experiments.models import DEFAULT_CHAT_TEMPLATE
    from po_experiments.stages.ppo_policy import prompt_dataset

    rows = [{"prompt": p, "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": "t1 t2"}],
             "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": "t2"}],
             "score_chosen": 8.0, "score_rejected": 3.0}
            for p in ("s1 s2", "s3 s4 s5", " ".join(["s6"] * 40))]  # the last one is too long for the cap
    path = tmp_path / "ultrafeedback.jsonl"
    path.write_text("\n".join(_json.dumps(r) for r in rows))
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    data = OmegaConf.structured(PaperDataConfig)
    data.preferences.path = str(path)
    cfg = OmegaConf.create({"data": data, "seed": 0,
                            "model": {"ppo": OmegaConf.structured(PPOHparams(max_prompt_length=30))}})
    dataset, lookup = prompt_dataset(cfg, tok)
    assert len(dataset) == 2  # the 40-word prompt is over max_prompt_length and dropped
    ids = dataset["input_ids"][0]
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = tok.decode(ids)
    assert lookup[text] == [{"role": "user", "content": "s1 s2"}]
