"""G (Eq. 3) for the DPO family: brute force per component, additivity, and its first-order meaning (Eq. 1-2)."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_pairs
from po_experiments.analysis.gradients import (
    DPO_COMPONENTS, dpo_alignment, dpo_coefficients, dprime_gradient, encode, encode_pairs,
    iqr_outliers, parameter_groups, sequence_logps, summarise,
)

ALGO = OmegaConf.create({"name": "dpo", "beta": 0.1})


@pytest.fixture
def setup(task, tokenizer, tiny_model):
    """A float64 'checkpoint' a little away from its reference, 12 pairs (3 mini-batches of 4) and 8 D' answers."""
    ref = tiny_model.double().eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    pairs = encode_pairs(tokenizer, make_pairs(task, 12, seed=1))
    with torch.no_grad():
        ref_logps = tuple(sequence_logps(ref, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
                          for s in ("chosen", "rejected"))
    prompts = task.heldout_prompts(8)
    answers = [task.completion_text([int(w[1:]) for w in p.split()[1:-1]]) for p in prompts]
    dprime = [encode(tokenizer, prompts[i:i + 4], answers[i:i + 4]) for i in (0, 4)]
    return model, pairs, ref_logps, dprime


def test_layer_groups_partition_the_parameters(tiny_model):
    groups = parameter_groups(tiny_model)
    assert groups.numel() == sum(p.numel() for p in tiny_model.parameters())
    assert set(groups.unique().tolist()) == {0, 1, 2}


def brute_force_G(model, pairs, ref_logps, g, comp, idx):
    """grad of the component's surrogate loss on mini-batch idx by plain autograd, dotted with g'."""
    with torch.no_grad():
        lp = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
              for s in ("chosen", "rejected")]
    coef = dpo_coefficients(*lp, *ref_logps, ALGO, 0)[comp]
    n = len(lp[0])
    live = [sequence_logps(model, pairs[f"{s}_ids"][idx], pairs[f"{s}_mask"][idx], pairs[f"{s}_comp"][idx])
            for s in ("chosen", "rejected")]
    loss = ((coef[idx] * live[0]).sum() + (coef[n + idx] * live[1]).sum()) / len(idx)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    flat = torch.cat([(gr if gr is not None else torch.zeros_like(p)).flatten()
                      for gr, p in zip(grads, model.parameters())])
    return flat @ g, flat.norm()


def test_every_component_equals_brute_force(setup):
    model, pairs, ref_logps, dprime = setup
    g = dprime_gradient(model, dprime)
    mb = dpo_alignment(model, pairs, ref_logps, g, parameter_groups(model), ALGO, step=0, batch_size=4)
    assert mb.G.shape == (3, 6, 4)
    for b in range(3):
        idx = torch.arange(4 * b, 4 * b + 4)
        for c, comp in enumerate(DPO_COMPONENTS):
            G, norm = brute_force_G(model, pairs, ref_logps, g, comp, idx)
            # 1e-6: HF's eager attention takes its softmax in float32 even in a float64 model
            assert mb.G[b, c, 0].item() == pytest.approx(G.item(), rel=1e-6, abs=1e-12)
            assert mb.norms[b, c].item() == pytest.approx(norm.item(), rel=1e-6, abs=1e-12)


def test_components_and_layer_groups_add_up(setup):
    model, pairs, ref_logps, dprime = setup
    G = dpo_alignment(model, pairs, ref_logps, dprime_gradient(model, dprime), parameter_groups(model), ALGO,
                      step=0).G
    c = {name: G[:, i] for i, name in enumerate(DPO_COMPONENTS)}
    scale = G.abs().max()
    assert torch.allclose(c["POS"] + c["NEG"], c["TOT"], atol=1e-12 * scale)
    assert torch.allclose(c["TOP"] + c["MID"] + c["BOT"], c["TOT"], atol=1e-12 * scale)
    assert torch.allclose(G[..., 1:].sum(-1), G[..., 0], atol=1e-12 * scale)  # bottom + middle + top = all
    assert (c["POS"] - c["TOT"]).abs().max() > 1e-6 * scale


@pytest.mark.parametrize("component", ["TOT", "POS"])
def test_first_order_meaning_of_G(setup, component):
    """-[NLL_D'(theta - eta grad L) - NLL_D'(theta)] / eta = G(L; theta), with a real optimizer step."""
    model, pairs, ref_logps, dprime = setup
    g = dprime_gradient(model, dprime)
    G = summarise(dpo_alignment(model, pairs, ref_logps, g, parameter_groups(model), ALGO, step=0))["G_unfiltered"][
        DPO_COMPONENTS.index(component), 0].item()

    def nll():
        with torch.no_grad():
            return -sum(sequence_logps(model, *b).sum() for b in dprime).item() / 8

    with torch.no_grad():  # grad L = mean over the mini-batches of their component gradients
        lp = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
              for s in ("chosen", "rejected")]
    coef = dpo_coefficients(*lp, *ref_logps, ALGO, 0)[component]
    live = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
            for s in ("chosen", "rejected")]
    loss = ((coef[:12] * live[0]).sum() + (coef[12:] * live[1]).sum()) / 12
    model.zero_grad()
    loss.backward()
    before, eta = nll(), 1e-3 / max(p.grad.norm().item() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=eta).step()
    measured = -(nll() - before) / eta
    assert abs(G) > 0
    assert measured == pytest.approx(G, rel=0.01)


def test_iqr_rule_by_hand():
    norms = torch.tensor([1.0, 1.1, 0.9, 1.2, 1.0, 5.0, 0.95, 1.05])
    q1, q3 = torch.quantile(norms, torch.tensor([0.25, 0.75]))
    assert iqr_outliers(norms).tolist() == (norms > q3 + 1.5 * (q3 - q1)).tolist()
    assert iqr_outliers(norms).nonzero().flatten().tolist() == [5]


# ============================================================================================== PPO
from po_experiments.analysis.gradients import ppo_alignment, ppo_token_coefficients  # noqa: E402
from po_experiments.trainers.ppo_objectives import WEIGHTINGS  # noqa: E402


@pytest.fixture
def ppo_setup(ppo, task, tokenizer):
    """A trained-for-one-update PPO checkpoint and the rollout its weights generate (theta_t, D_t)."""
    trainer = ppo(prompt_words=5)
    trainer.update(trainer.make_rollout(trainer.batch_for(1)), step=0)
    rollout = trainer.make_rollout(trainer.batch_for(2))
    model = trainer.accelerator.unwrap_model(trainer.model).policy.eval()
    model.config._attn_implementation = "eager"
    prompts = task.heldout_prompts(8)
    answers = [task.completion_text([int(w[1:]) for w in p.split()[1:-1]]) for p in prompts]
    dprime = [encode(tokenizer, prompts[i:i + 4], answers[i:i + 4]) for i in (0, 4)]
    coef = ppo_token_coefficients(rollout, trainer.algo, 1, WEIGHTINGS["ppo"])
    return model, rollout, dprime, coef


def ppo_brute_force(model, rollout, g, coef, idx):
    from po_experiments.analysis.gradients import _response_logps

    live = dict(model.named_parameters())
    lp = _response_logps(model, live, rollout, idx, 1.0).masked_fill(~rollout.valid[idx], 0.0)
    loss = (coef[idx] * lp).sum() / rollout.valid[idx].sum()
    grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
    flat = torch.cat([(gr if gr is not None else torch.zeros_like(p)).flatten().double()
                      for gr, p in zip(grads, live.values())])
    return flat @ g.double()


def test_ppo_components_equal_brute_force_and_add_up(ppo_setup):
    model, rollout, dprime, coef = ppo_setup
    g = dprime_gradient(model, dprime)
    groups = parameter_groups(model)
    mb = ppo_alignment(model, rollout, g, groups, coef, batch_size=6)
    assert mb.G.shape[1:] == (6, 4) and torch.isfinite(mb.norms[:, 0]).all()
    idx = torch.arange(0, 6)
    for c, comp in enumerate(DPO_COMPONENTS):
        assert mb.G[0, c, 0].item() == pytest.approx(ppo_brute_force(model, rollout, g, coef[comp], idx).item(),
                                                     rel=1e-6, abs=1e-12)
        bottom = torch.where(groups == 0, g, torch.zeros_like(g))
        assert mb.G[0, c, 1].item() == pytest.approx(
            ppo_brute_force(model, rollout, bottom, coef[comp], idx).item(), rel=1e-6, abs=1e-12)
    G = mb.G
    c = {name: G[:, i] for i, name in enumerate(DPO_COMPONENTS)}
    scale = G.abs().max()
    assert torch.allclose(c["POS"] + c["NEG"], c["TOT"], atol=1e-10 * scale)
    assert torch.allclose(c["TOP"] + c["MID"] + c["BOT"], c["TOT"], atol=1e-10 * scale)
    assert torch.allclose(G[..., 1:].sum(-1), G[..., 0], atol=1e-10 * scale)


def test_ppo_first_order_meaning_of_G(ppo_setup):
    model, rollout, dprime, coef = ppo_setup
    g = dprime_gradient(model, dprime)
    mb = ppo_alignment(model, rollout, g, parameter_groups(model), coef, batch_size=6)
    G = mb.G[:, 0, 0].mean().item()

    def nll():
        with torch.no_grad():
            return -sum(sequence_logps(model, *b).sum() for b in dprime).item() / 8

    from po_experiments.analysis.gradients import _response_logps

    model.zero_grad()
    live = dict(model.named_parameters())
    n = rollout.valid.shape[0]
    total = 0
    for s in range(0, n, 6):  # grad L = mean over mini-batches of their policy-loss gradients
        idx = torch.arange(s, min(s + 6, n))
        lp = _response_logps(model, live, rollout, idx, 1.0).masked_fill(~rollout.valid[idx], 0.0)
        total = total + (coef["TOT"][idx] * lp).sum() / rollout.valid[idx].sum()
    (total / len(range(0, n, 6))).backward()
    before, eta = nll(), 1e-3 / max(p.grad.norm().item() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=eta).step()
    assert abs(G) > 0 and -(nll() - before) / eta == pytest.approx(G, rel=0.01)


def test_forward_mode_dpo_equals_vmap(setup):
    """The billion-parameter path (jvp, no per-example gradients) gives the same G as the vmap path."""
    from po_experiments.analysis.gradients import dpo_alignment_jvp

    model, pairs, ref_logps, dprime = setup
    model.float()  # eager attention in float64 NaNs on left padding; pairs are right-padded, but stay realistic
    g = dprime_gradient(model, dprime)
    groups = parameter_groups(model)
    via_vmap = dpo_alignment(model, pairs, ref_logps, g, groups, ALGO, step=0)
    via_jvp = dpo_alignment_jvp(model, pairs, ref_logps, g, groups, ALGO, step=0)
    scale = via_vmap.G.abs().max()
    assert torch.allclose(via_jvp.G, via_vmap.G, atol=1e-4 * scale)
    assert torch.allclose(via_jvp.norms[:, 0], via_vmap.norms[:, 0], rtol=1e-4)
