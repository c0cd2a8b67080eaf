"""The paper's formulas, checked against stock TRL and against each other (gradients in float64)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from trl import DPOTrainer

from conftest import dpo_trainer, first_batch, make_pairs, nudge
from po_experiments.trainers.ablations import ABLATIONS
from po_experiments.objectives import OBJECTIVES
from po_experiments.objectives.pairwise import PairTerms, Thirds, coverage, objective, rank_thirds
from po_experiments.objectives.pairwise import schedule_lambda as cdpo_lambda
from po_experiments.objectives.pairwise_losses import decompose

ALGORITHMS = {name: (lambda t, a, _n=name: decompose(t, OmegaConf.merge({"name": _n}, a)))
              for name, spec in OBJECTIVES.items() if spec.family == "dpo"}


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def loss_grad(trainer, compute, inputs) -> torch.Tensor:
    trainer.model.zero_grad(set_to_none=True)
    compute(trainer.model, inputs, False).backward()
    return grads(trainer.model)


@pytest.fixture
def trainer_and_batch(task, tokenizer, tiny_model, tmp_path):
    """Our trainer on a float64 model, and one collated batch of 12 pairs."""
    def build(algo=None, ablation=None):
        model = tiny_model.double()
        trainer = dpo_trainer(model, tokenizer, make_pairs(task, 24), tmp_path, algo or {}, ablation, batch=12)
        trainer.ref_model.double()
        # a few random steps away from the reference, so omega and the log-ratios are not all equal
        nudge(model)
        return trainer, first_batch(trainer)
    return build


def test_pos_plus_neg_equals_stock_trl_sigmoid_dpo(trainer_and_batch):
    trainer, inputs = trainer_and_batch({"components": ["POS", "NEG"]})
    stock = loss_grad(trainer, lambda m, x, r: DPOTrainer._compute_loss(trainer, m, x, r), inputs)
    ours = loss_grad(trainer, trainer._compute_loss, inputs)
    assert stock.norm() > 0
    assert rel_err(ours, stock) < 1e-6


def test_component_gradients_add_up(trainer_and_batch):
    trainer, inputs = trainer_and_batch()
    g = {}
    for comp in ["TOT", "POS", "NEG", "TOP", "MID", "BOT"]:
        trainer.algo.components = [comp]
        g[comp] = loss_grad(trainer, trainer._compute_loss, inputs)
    assert rel_err(g["POS"] + g["NEG"], g["TOT"]) < 1e-10
    assert rel_err(g["TOP"] + g["MID"] + g["BOT"], g["TOT"]) < 1e-10
    # each component really is a part, not the whole or nothing
    for comp in ["POS", "NEG", "TOP", "MID", "BOT"]:
        assert 1e-3 < rel_err(g[comp], g["TOT"]) and g[comp].norm() > 0


def test_logged_loss_is_the_dpo_loss_whatever_the_mask(trainer_and_batch):
    trainer, inputs = trainer_and_batch({"components": ["POS"]})
    stock = DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    ours = trainer._compute_loss(trainer.model, inputs, False)
    assert torch.allclose(ours, stock, rtol=1e-12)


def _terms(n=9, seed=0, step=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(n, generator=g, dtype=torch.float64) - 5 for _ in range(4)]
    t[0].requires_grad_(True)
    t[1].requires_grad_(True)
    return PairTerms(t[0], t[1], t[2], t[3], step=step)


def _grad(loss, t: PairTerms):
    return torch.cat(torch.autograd.grad(loss, [t.chosen, t.rejected]))


def test_cdpo_with_lambda_half_equals_dpo_with_half_beta():
    t = _terms(step=10)
    cdpo = ALGORITHMS["cdpo"](t, OmegaConf.create({"beta": 0.2, "t1": 0, "t2": 20}))
    dpo = ALGORITHMS["dpo"](t, OmegaConf.create({"beta": 0.1}))
    assert cdpo.scalars["lambda"] == 0.5
    assert torch.allclose(cdpo.loss, dpo.loss, rtol=1e-12)
    assert torch.allclose(_grad(cdpo.loss.sum(), t), _grad(dpo.loss.sum(), t), rtol=1e-12)


@pytest.mark.parametrize("name,algo", [("dpo", {"beta": 0.1}), ("cdpo", {"beta": 0.1, "t1": 2, "t2": 8})])
@pytest.mark.parametrize("step", [0, 5, 10])
def test_surrogate_gradient_equals_the_algorithms_loss(name, algo, step):
    """Eq. 5 (and its cDPO analogue): -w+ log pi(y+) + w- log pi(y-) has the loss's gradient."""
    t = _terms(step=step)
    d = ALGORITHMS[name](t, OmegaConf.create(algo))
    everything = coverage(["TOT"], [], Thirds(rank_thirds(d.w_pos), rank_thirds(d.w_neg)), d.extras)
    assert torch.allclose(_grad(objective(d, t, everything), t), _grad(d.loss.mean(), t), rtol=1e-12)


def test_cdpo_lambda_schedule():
    t1, t2 = 2500, 5500
    assert cdpo_lambda(0, t1, t2) == 0.0
    assert cdpo_lambda(2500, t1, t2) == 0.0
    assert cdpo_lambda(3250, t1, t2) == pytest.approx(0.25)
    assert cdpo_lambda(4000, t1, t2) == pytest.approx(0.5)
    assert cdpo_lambda(5500, t1, t2) == 1.0
    assert cdpo_lambda(9000, t1, t2) == 1.0


def test_cdpo_moves_weight_from_chosen_to_rejected():
    t = _terms(step=0)
    algo = OmegaConf.create({"beta": 0.1, "t1": 10, "t2": 20})
    early, late = ALGORITHMS["cdpo"](t, algo), ALGORITHMS["cdpo"](PairTerms(**{**t.__dict__, "step": 30}), algo)
    assert early.w_neg.abs().sum() == 0 and early.w_pos.min() > 0  # pure positive learning before t1
    assert late.w_pos.abs().sum() == 0 and late.w_neg.min() > 0  # pure negative learning after t2


@pytest.mark.parametrize("n", range(3, 13))
def test_rank_thirds_with_all_equal_omega(n):
    thirds = rank_thirds(torch.full((n,), 0.05))
    counts = torch.bincount(thirds, minlength=3)
    assert counts.sum() == n and (counts > 0).all()
    assert counts.max() - counts.min() <= 1


def test_rank_thirds_orders_by_value():
    values = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    assert rank_thirds(values).tolist() == [2, 0, 1, 1, 2, 0]


def test_masks_partition_pairs_and_sides():
    thirds = rank_thirds(torch.rand(10))
    th = Thirds(thirds, thirds)
    c = coverage(["TOP", "MID", "BOT"], [], th)
    assert c.pos.eq(1).all() and c.neg.eq(1).all()
    c = coverage(["TOT"], ["NEG"], th)
    assert c.pos.eq(1).all() and c.neg.eq(0).all()
    c = coverage(["TOT"], ["TOP"], th)
    assert c.pos.tolist() == (thirds != 2).float().tolist() and c.neg.tolist() == c.pos.tolist()


def test_thirds_are_per_side_when_the_sides_differ():
    pos, neg = rank_thirds(torch.tensor([0.1, 0.2, 0.3])), rank_thirds(torch.tensor([0.3, 0.2, 0.1]))
    c = coverage(["TOP"], [], Thirds(pos, neg))
    assert c.pos.tolist() == [0, 0, 1] and c.neg.tolist() == [1, 0, 0]


def test_extra_terms_are_their_own_component():
    th = Thirds(rank_thirds(torch.rand(6)), rank_thirds(torch.rand(6)))
    assert coverage(["TOT"], [], th, ("NLL",)).extras == {"NLL"}
    assert coverage(["POS", "NEG"], [], th, ("NLL",)).extras == set()
    assert coverage(["TOT"], ["NLL"], th, ("NLL",)).extras == set()
    assert coverage(["NLL"], [], th, ("NLL",)).pos.sum() == 0


def test_drop_window_ablation():
    wo_neg = OmegaConf.create({"drop": ["NEG"], "start_step": 0, "stop_step": 3000})
    assert ABLATIONS["drop_window"](0, wo_neg) == ["NEG"]
    assert ABLATIONS["drop_window"](2999, wo_neg) == ["NEG"]
    assert ABLATIONS["drop_window"](3000, wo_neg) == []
    wo_pos = OmegaConf.create({"drop": ["POS"], "start_step": 6000, "stop_step": None})
    assert ABLATIONS["drop_window"](5999, wo_pos) == []
    assert ABLATIONS["drop_window"](6000, wo_pos) == ["POS"]
    assert ABLATIONS["drop_window"](10**6, wo_pos) == ["POS"]


def test_trainer_drops_negative_learning_inside_the_window(trainer_and_batch):
    trainer, inputs = trainer_and_batch(ablation={"name": "drop_window", "drop": ["NEG"], "stop_step": 3})
    trainer.state.global_step = 2
    inside = loss_grad(trainer, trainer._compute_loss, inputs)
    trainer.state.global_step = 3
    outside = loss_grad(trainer, trainer._compute_loss, inputs)
    trainer.algo.components = ["POS"]
    pos_only = loss_grad(trainer, trainer._compute_loss, inputs)
    assert rel_err(inside, pos_only) < 1e-12
    assert rel_err(inside, outside) > 1e-3
