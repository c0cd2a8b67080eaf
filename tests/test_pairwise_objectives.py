"""Every registered pairwise objective: its weights are its gradient, its components add up (in the formula, in the
trainer and in G), G has its first-order meaning, and each equals TRL's own loss where TRL has one (float64)."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from trl import DPOTrainer

from test_alignment import setup  # noqa: F401  (fixture: a float64 checkpoint, 12 pairs, D')
from test_config import make
from test_objectives import loss_grad, rel_err, trainer_and_batch  # noqa: F401  (fixture)
from po_experiments.analysis.gradients import (dpo_alignment, dprime_gradient, sequence_logps,
                                               summarise)
from po_experiments.config import validate
from po_experiments.errors import ConfigError
from po_experiments.objectives import BASE_COMPONENTS, OBJECTIVES, components_of
from po_experiments.objectives.pairwise import (PairTerms, build_pair_terms, component_coefficients, coverage,
                                                objective, thirds_of)
from po_experiments.objectives.pairwise_losses import decompose, unpaired_side

PAIRWISE = sorted(name for name, spec in OBJECTIVES.items() if spec.family == "dpo")
SCHEDULE = {"t1": 2, "t2": 8}  # the controlled schedule (cDPO's own, or generic): lambda = 0.5 at step 5


def algo_of(name: str, **overrides):
    """The objective's schema defaults, t1/t2 where it requires them, and `overrides`."""
    algo = OmegaConf.structured(OBJECTIVES[name].schema)
    algo.name = name
    for key, value in SCHEDULE.items():
        if OmegaConf.is_missing(algo, key):
            algo[key] = value
    return OmegaConf.merge(algo, overrides)


def random_terms(n: int = 12, seed: int = 0, step: int = 5) -> PairTerms:
    """Sequence log-probs of n pairs with lengths 2-9, per-token averages in (-2.1, -0.1) (ORPO's odds need
    p < 1), references nearby, and a side key per pair."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (2, n), generator=g).double()
    logps = -(2 * torch.rand(2, n, generator=g, dtype=torch.float64) + 0.1) * lengths
    ref = logps + 0.5 * torch.randn(2, n, generator=g, dtype=torch.float64)
    return PairTerms(logps[0].clone().requires_grad_(True), logps[1].clone().requires_grad_(True), ref[0], ref[1],
                     lengths[0], lengths[1], step, torch.randint(0, 10**6, (n,), generator=g))


def policy_grad(loss, t: PairTerms) -> torch.Tensor:
    return torch.cat(torch.autograd.grad(loss, [t.chosen, t.rejected]))


# =================================================================================== 1. invariants


@pytest.mark.parametrize("step", [0, 5, 10])
@pytest.mark.parametrize("name", PAIRWISE)
def test_weights_are_the_gradient_of_the_loss(name, step):
    """(a) d/dlog pi of the TOT surrogate = d/dlog pi of the objective's own mean loss. (The generic t1/t2 schedule
    scales the weights and keeps the logged loss unscheduled, as an ablation's mask does: its test is below.)"""
    t = random_terms(step=step)
    d = decompose(t, algo_of(name))
    everything = coverage(["TOT"], [], thirds_of(d), d.extras)
    ours, loss = policy_grad(objective(d, t, everything), t), policy_grad(d.loss.mean(), t)
    assert loss.norm() > 0
    assert torch.allclose(ours, loss, rtol=1e-10, atol=1e-14 * loss.abs().max())


@pytest.mark.parametrize("name", PAIRWISE)
def test_components_add_up_in_the_coefficients(name):
    """(b) POS + NEG + extras = TOT = TOP + MID + BOT + extras, coefficient by coefficient."""
    algo = algo_of(name)
    c = component_coefficients(decompose(random_terms(), algo), components_of(algo))
    extras = sum((c[e] for e in OBJECTIVES[name].extra_components), torch.zeros_like(c["TOT"]))
    scale = c["TOT"].abs().max()
    assert torch.allclose(c["POS"] + c["NEG"] + extras, c["TOT"], rtol=0, atol=1e-15 * scale)
    assert torch.allclose(c["TOP"] + c["MID"] + c["BOT"] + extras, c["TOT"], rtol=0, atol=1e-15 * scale)
    for comp in components_of(algo)[1:]:  # each a real part: not nothing, not the whole
        assert c[comp].abs().max() > 0 and not torch.equal(c[comp], c["TOT"]), comp


@pytest.mark.parametrize("name", PAIRWISE)
def test_component_gradients_add_up_in_the_trainer(name, trainer_and_batch):
    """(c) the same through ComponentDPOTrainer on a float64 model: each part non-trivial, the parts the whole."""
    algo = algo_of(name)
    trainer, inputs = trainer_and_batch(OmegaConf.to_container(algo))
    trainer.state.global_step = 5  # inside t1..t2 where the objective has a schedule: both sides learn
    g = {}
    for comp in components_of(algo):
        trainer.algo.components = [comp]
        g[comp] = loss_grad(trainer, trainer._compute_loss, inputs)
    extras = sum((g[e] for e in OBJECTIVES[name].extra_components), torch.zeros_like(g["TOT"]))
    assert rel_err(g["POS"] + g["NEG"] + extras, g["TOT"]) < 1e-10
    assert rel_err(g["TOP"] + g["MID"] + g["BOT"] + extras, g["TOT"]) < 1e-10
    for comp in components_of(algo)[1:]:
        assert g[comp].norm() > 0 and rel_err(g[comp], g["TOT"]) > 1e-3, comp


def _pair_terms_of(pairs, chosen, rejected, ref_logps, step):
    return build_pair_terms(chosen, rejected, *ref_logps, step=step, chosen_ids=pairs["chosen_ids"][:, 1:],
                            chosen_completion=pairs["chosen_comp"][:, 1:],
                            rejected_completion=pairs["rejected_comp"][:, 1:])


@pytest.mark.parametrize("name", PAIRWISE)
def test_first_order_meaning_of_G(name, setup):  # noqa: F811
    """(d) -[NLL_D'(theta - eta grad L) - NLL_D'(theta)] / eta = G(TOT) for one SGD step on the objective's own
    loss; and the G analysis' components add up for this objective too."""
    model, pairs, ref_logps, dprime = setup
    algo, step = algo_of(name), 5
    g = dprime_gradient(model, dprime)
    mb = dpo_alignment(model, pairs, ref_logps, g, algo, step=step)
    assert mb.components == components_of(algo)
    G = {c: summarise(mb)["G_unfiltered"][i, 0].item() for i, c in enumerate(mb.components)}
    extras = sum(G[e] for e in OBJECTIVES[name].extra_components)
    scale = max(abs(v) for v in G.values())
    assert G["POS"] + G["NEG"] + extras == pytest.approx(G["TOT"], abs=1e-10 * scale)
    assert G["TOP"] + G["MID"] + G["BOT"] + extras == pytest.approx(G["TOT"], abs=1e-10 * scale)

    def nll():
        with torch.no_grad():
            return -sum(sequence_logps(model, *b).sum() for b in dprime).item() / 8

    live = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
            for s in ("chosen", "rejected")]
    model.zero_grad()
    decompose(_pair_terms_of(pairs, *live, ref_logps, step), algo).loss.mean().backward()
    before, eta = nll(), 1e-3 / max(p.grad.norm().item() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=eta).step()
    assert abs(G["TOT"]) > 0
    assert -(nll() - before) / eta == pytest.approx(G["TOT"], rel=0.01)


@pytest.mark.parametrize("name", sorted(n for n in PAIRWISE if not OBJECTIVES[n].schedules_itself))
def test_the_controlled_schedule_on_any_objective(name):
    """The paper's cDPO generalised: (1 - lambda) w+ and lambda w-: pure positive learning before t1, pure
    negative after t2, additivity intact and the extra terms untouched."""
    algo = algo_of(name, **SCHEDULE)
    plain = decompose(random_terms(step=0), algo_of(name))
    early, middle, late = (decompose(random_terms(step=s), algo) for s in (0, 5, 20))
    assert early.w_neg.abs().max() == 0 and torch.allclose(early.w_pos, plain.w_pos, rtol=1e-12)
    assert late.w_pos.abs().max() == 0 and torch.allclose(late.w_neg, plain.w_neg, rtol=1e-12)
    assert middle.scalars["lambda"] == 0.5 and torch.allclose(middle.w_pos, plain.w_pos / 2, rtol=1e-12)
    for d in (early, middle, late):
        assert set(d.extras) == set(OBJECTIVES[name].extra_components)
        for e, (a_pos, a_neg) in d.extras.items():
            assert torch.equal(a_pos, plain.extras[e][0]) and torch.equal(a_neg, plain.extras[e][1])
        c = component_coefficients(d, components_of(algo))
        extras = sum((c[e] for e in d.extras), torch.zeros_like(c["TOT"]))
        assert torch.allclose(c["POS"] + c["NEG"] + extras, c["TOT"], rtol=0, atol=1e-15)
        assert torch.allclose(c["TOP"] + c["MID"] + c["BOT"] + extras, c["TOT"], rtol=0, atol=1e-15)


def test_nll_weight_is_the_batch_token_mean():
    """alpha n / sum|y+| on each pair's log pi(y+): the mean over pairs is alpha x the token-mean NLL."""
    t = random_terms()
    d = decompose(t, algo_of("rpo", alpha=0.7))
    a_pos, a_neg = d.extras["NLL"]
    assert torch.allclose(a_pos, 0.7 * 12 / t.chosen_len.sum() * torch.ones(12, dtype=torch.float64), rtol=1e-14)
    assert a_neg.abs().max() == 0
    dpo = decompose(t, algo_of("dpo"))
    assert torch.allclose(d.loss.mean() - dpo.loss.mean(), -0.7 * t.chosen.sum() / t.chosen_len.sum(), rtol=1e-12)


def test_kto_reference_point_and_unpaired_sides():
    t = random_terms(n=30)
    paired, unpaired = decompose(t, algo_of("kto")), decompose(t, algo_of("kto_unpaired"))
    r_pos, r_neg = (t.chosen - t.ref_chosen).detach(), (t.rejected - t.ref_rejected).detach()
    assert paired.scalars["kto/z0"] == pytest.approx(max(0.0, torch.cat([r_pos, r_neg]).mean().item()))
    keep = unpaired_side(t)
    assert keep.tolist() == (t.side_key % 2 == 0).tolist() and 0 < keep.sum() < 30
    assert unpaired.scalars["kto/z0"] == pytest.approx(max(0.0, torch.cat([r_pos[keep], r_neg[~keep]]).mean().item()))
    assert (unpaired.w_pos[~keep] == 0).all() and (unpaired.w_neg[keep] == 0).all()
    assert (unpaired.w_pos[keep] > 0).all() and (unpaired.w_neg[~keep] > 0).all()
    with pytest.raises(ValueError, match="side_key"):
        decompose(PairTerms(t.chosen, t.rejected, t.ref_chosen, t.ref_rejected), algo_of("kto_unpaired"))


def test_orpo_weights_stay_finite_as_the_chosen_response_becomes_certain():
    """Near p+ = 0 the closed form agrees with autograd of the loss; at p+ = 0, where autograd gives NaN, it gives
    the limit beta / ((e^-p- - 1) |y+|) on y+ and nothing on y-."""
    lengths = torch.tensor([4.0, 6.0], dtype=torch.float64)
    algo = algo_of("orpo", beta=0.3)
    near = PairTerms(torch.tensor([-4e-9, -6e-7], dtype=torch.float64, requires_grad=True),
                     torch.tensor([-8.0, -3.0], dtype=torch.float64, requires_grad=True),
                     torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), lengths, lengths)
    d = decompose(near, algo)
    nll = d.extras["NLL"][0]
    autograd = policy_grad(d.loss.sum(), near)
    assert torch.allclose(torch.cat([-(d.w_pos + nll), d.w_neg]), autograd, rtol=1e-6)
    certain = PairTerms(torch.zeros(2, dtype=torch.float64), near.rejected.detach(), near.ref_chosen,
                        near.ref_rejected, lengths, lengths)
    d = decompose(certain, algo)
    p_neg = certain.rejected / lengths
    assert torch.allclose(d.w_pos, 0.3 / (torch.expm1(-p_neg) * lengths), rtol=1e-12)
    assert (d.w_neg == 0).all() and torch.isfinite(d.loss).all()


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo", "cpo"])
def test_length_normalised_objectives_need_lengths(name):
    t = random_terms()
    with pytest.raises(ValueError, match="completion"):
        decompose(PairTerms(t.chosen, t.rejected, t.ref_chosen, t.ref_rejected), algo_of(name))


# ================================================================================ 2. equivalence with TRL
# TRL's functions on log-probs of the same float64 model (with autograd); compared on the model gradient.


def stock_dpo_grad(trainer, inputs, loss_types, loss_weights):
    trainer.loss_types, trainer.loss_weights = loss_types, loss_weights
    return loss_grad(trainer, lambda m, x, r: DPOTrainer._compute_loss(trainer, m, x, r), inputs)


def ours_grad(trainer, inputs, components=("TOT",)):
    trainer.algo.components = list(components)
    return loss_grad(trainer, trainer._compute_loss, inputs)


def without_init(cls, **attrs):
    """A TRL trainer object with only the attributes its loss methods read (its __init__ tokenizes datasets)."""
    obj = object.__new__(cls)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    obj.__dict__.update(accelerator=accelerator, is_encoder_decoder=False, aux_loss_enabled=False, **attrs)
    return obj


def paired_batch(inputs, pad_token_id):
    """TRL's CPO/ORPO batch (chosen_/rejected_ input_ids, attention_mask, labels: -100 off the completion) from a
    collated DPO batch ([chosen; rejected] along the batch)."""
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    out = {}
    for side, half in zip(("chosen", "rejected"), range(2)):
        for key, value in (("input_ids", inputs["input_ids"]), ("attention_mask", inputs["attention_mask"]),
                           ("labels", labels)):
            out[f"{side}_{key}"] = value.chunk(2)[half]
    return out


def assert_same_gradient(ours, stock, tol=1e-6, what=""):
    """Relative error of our model gradient against TRL's (printed: `pytest -s` shows the measured values)."""
    err = rel_err(ours, stock)
    print(f"relative gradient error {what}: {err:.1e}")
    assert stock.norm() > 0 and err < tol


def model_grad(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_ipo_equals_trl(trainer_and_batch):
    trainer, inputs = trainer_and_batch({"name": "ipo", "beta": 0.5})
    stock = stock_dpo_grad(trainer, inputs, ["ipo"], [1.0])
    assert_same_gradient(ours_grad(trainer, inputs), stock, what=trainer.algo.name)


def test_rpo_equals_trl(trainer_and_batch):
    trainer, inputs = trainer_and_batch({"name": "rpo", "beta": 0.1, "alpha": 0.7})
    stock = stock_dpo_grad(trainer, inputs, ["sigmoid", "sft"], [1.0, 0.7])
    assert_same_gradient(ours_grad(trainer, inputs), stock, what="rpo")
    # and the parts: DPO alone (POS + NEG) and the NLL alone (TRL's sft with weight alpha)
    assert_same_gradient(ours_grad(trainer, inputs, ["POS", "NEG"]), stock_dpo_grad(trainer, inputs, ["sigmoid"], [1.0]),
                         what="rpo POS+NEG vs sigmoid")
    assert_same_gradient(ours_grad(trainer, inputs, ["NLL"]), stock_dpo_grad(trainer, inputs, ["sft"], [0.7]),
                         what="rpo NLL vs sft")


def cpo_trainer(trainer, **attrs):
    from trl.experimental.cpo import CPOTrainer

    return without_init(CPOTrainer, **{"pad_token_id": trainer.processing_class.pad_token_id, "label_smoothing": 0.0,
                                       "alpha": 0.0, "simpo_gamma": 0.5, **attrs})


@pytest.mark.parametrize("name,algo,trl", [
    ("simpo", {"beta": 2.0, "gamma": 1.0}, {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}),
    ("cpo", {"beta": 0.1, "alpha": 0.7}, {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 0.7}),
])
def test_simpo_and_cpo_equal_trl(name, algo, trl, trainer_and_batch):
    trainer, inputs = trainer_and_batch({"name": name, **algo})
    cpo = cpo_trainer(trainer, **trl)
    stock_loss, _ = cpo.get_batch_loss_metrics(trainer.model, paired_batch(inputs, cpo.pad_token_id))
    stock = model_grad(trainer.model, stock_loss)
    assert_same_gradient(ours_grad(trainer, inputs), stock, what=trainer.algo.name)


def test_orpo_equals_trl(trainer_and_batch):
    """TRL's odds-ratio term (its average log-probs and odds_ratio_loss) plus the NLL of y+'s completion tokens
    (TRL's CPO NLL; TRL's ORPOTrainer also counts the prompt's tokens in its NLL, ORPO's Eq. 2 does not)."""
    from trl.experimental.orpo import ORPOTrainer

    trainer, inputs = trainer_and_batch({"name": "orpo", "beta": 0.3})
    orpo = without_init(ORPOTrainer, padding_value=trainer.processing_class.pad_token_id, beta=0.3)
    batch = paired_batch(inputs, orpo.padding_value)

    def odds_ratio_term():
        chosen, rejected = orpo.concatenated_forward(trainer.model, batch)[:2]
        return -orpo.odds_ratio_loss(chosen, rejected)[0].mean()

    def nll_term():
        return cpo_trainer(trainer, loss_type="sigmoid", beta=0.3, cpo_alpha=1.0).concatenated_forward(
            trainer.model, batch)[4]

    stock_or, stock_nll = model_grad(trainer.model, odds_ratio_term()), model_grad(trainer.model, nll_term())
    assert_same_gradient(ours_grad(trainer, inputs, ["POS", "NEG"]), stock_or, what="orpo odds ratio")
    assert_same_gradient(ours_grad(trainer, inputs, ["NLL"]), stock_nll, what="orpo NLL")
    assert_same_gradient(ours_grad(trainer, inputs), model_grad(trainer.model, odds_ratio_term() + nll_term()),
                         what="orpo")


def with_reference(trainer, inputs, shift: float):
    """The batch with its reference log-probs in it (as precompute_ref_log_probs gives them), lowered by `shift`:
    another reference, under which the mean log-ratio (KTO's z0 before its clamp) is larger."""
    with torch.no_grad():
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    return {**inputs, "ref_chosen_logps": ref_chosen - shift, "ref_rejected_logps": ref_rejected - shift}


def kto_stock_loss(trainer, inputs, rows, labels, algo):
    """TRL's KTOTrainer._compute_loss on the sequences `rows` of the collated batch (labels: desirable or not),
    its KL batch the same sequences: TRL's z0 = clamp(mean log-ratio of these responses, 0), as ours. Returns the
    loss and TRL's z0."""
    from trl import KTOTrainer

    ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])[rows]
    seqs = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "completion_mask")}
    batch = {**seqs, "label": labels, "ref_logps": ref, "ref_KL_logps": ref,
             **{f"KL_{k}": v for k, v in seqs.items()}}
    kto = without_init(KTOTrainer, model=trainer.model, calculate_KL=True, use_liger_kernel=False, _is_vlm=False,
                       precompute_ref_logps=True, loss_type="kto", beta=algo["beta"],
                       desirable_weight=algo["desirable_weight"], undesirable_weight=algo["undesirable_weight"],
                       _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0)
    return kto._compute_loss(trainer.model, batch, False), kto._metrics["train"]["kl"][-1]


KTO = {"beta": 0.3, "desirable_weight": 1.3, "undesirable_weight": 0.8}


@pytest.mark.parametrize("shift", [0.0, 2.0], ids=["z0-clamped", "z0-positive"])
def test_kto_equals_trl(shift, trainer_and_batch):
    trainer, inputs = trainer_and_batch({"name": "kto", **KTO})
    inputs = with_reference(trainer, inputs, shift)
    n = len(inputs["input_ids"]) // 2
    loss, z0 = kto_stock_loss(trainer, inputs, torch.arange(2 * n), torch.arange(2 * n) < n, KTO)
    assert_same_gradient(ours_grad(trainer, inputs), model_grad(trainer.model, loss), what=f"kto (z0 {z0:.3g})")
    assert decompose(trainer.pair_terms(trainer.model, inputs), trainer.algo).scalars["kto/z0"] == \
        pytest.approx(z0, rel=1e-10, abs=1e-12)
    assert (z0 > 0) == (shift > 0)  # both branches of the clamp are compared


@pytest.mark.parametrize("shift", [0.0, 2.0], ids=["z0-clamped", "z0-positive"])
def test_kto_unpaired_equals_trl_on_the_kept_responses(shift, trainer_and_batch):
    trainer, inputs = trainer_and_batch({"name": "kto_unpaired", **KTO})
    inputs = with_reference(trainer, inputs, shift)
    n = len(inputs["input_ids"]) // 2
    keep_pos = unpaired_side(trainer.pair_terms(trainer.model, inputs))
    assert 0 < keep_pos.sum() < n  # both kinds of example in the batch
    rows = torch.where(keep_pos, torch.arange(n), n + torch.arange(n))
    loss, z0 = kto_stock_loss(trainer, inputs, rows, keep_pos, KTO)
    assert_same_gradient(ours_grad(trainer, inputs), model_grad(trainer.model, loss),
                         what=f"kto_unpaired (z0 {z0:.3g})")


def test_dpop_equals_its_formula_by_autograd(trainer_and_batch):
    """TRL has no DPOP: -log sigmoid(beta [logratio+ - logratio- - lambda max(0, ref+ - log pi(y+))]) by autograd."""
    trainer, inputs = trainer_and_batch({"name": "dpop", "beta": 0.1, "dpop_lambda": 5.0})
    t = trainer.pair_terms(trainer.model, inputs)
    below = t.ref_chosen > t.chosen
    assert 0 < below.sum() < len(below)  # both sides of the kink in the batch
    z = 0.1 * ((t.chosen - t.ref_chosen) - (t.rejected - t.ref_rejected)
               - 5.0 * torch.clamp(t.ref_chosen - t.chosen, min=0))
    direct = model_grad(trainer.model, -F.logsigmoid(z).mean())
    assert_same_gradient(ours_grad(trainer, inputs), direct, tol=1e-10, what="dpop")


# ====================================================================================== 3. configuration

NEW = ["ipo", "simpo", "cpo", "orpo", "rpo", "dpop", "kto", "kto_unpaired"]


@pytest.mark.parametrize("name", NEW)
def test_every_new_objective_composes_and_validates(name):
    cfg = make([f"algo={name}"])
    validate(cfg)
    assert cfg.algo.name == name and cfg.algo.family == "dpo"
    assert components_of(cfg.algo) == BASE_COMPONENTS + OBJECTIVES[name].extra_components
    validate(make([f"algo={name}", "algo.t1=10", "algo.t2=20", f"algo.components=[{components_of(cfg.algo)[-1]}]"]))


@pytest.mark.parametrize("override,key", [
    ("algo=simpo algo.gamma=-0.5", "algo.gamma"),
    ("algo=simpo algo.t1=5", "algo.t2"),
    ("algo=ipo algo.beta=0", "algo.beta"),
    ("algo=cpo algo.alpha=-1", "algo.alpha"),
    ("algo=rpo algo.alpha=-0.1", "algo.alpha"),
    ("algo=dpop algo.dpop_lambda=-1", "algo.dpop_lambda"),
    ("algo=kto algo.desirable_weight=0", "algo.desirable_weight"),
    ("algo=kto_unpaired algo.undesirable_weight=-1", "algo.undesirable_weight"),
    ("algo=simpo algo.components=[NLL]", "algo.components"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make(override.split()))


def test_labels_come_from_the_registry():
    from po_experiments.reporting.methods import describe

    assert describe(make(["algo=simpo"]))["method"] == "SimPO"
    assert describe(make(["algo=kto_unpaired"]))["method"] == "KTO-unpaired"
    assert describe(make(["algo=orpo", "algo.t1=10", "algo.t2=20"]))["method"] == "ORPO (t1=10, t2=20)"
    assert describe(make(["algo=cpo", "algo.alpha=0.5"]))["method"] == "CPO (alpha=0.5)"


# ====================================================================================== 4. end to end


@pytest.fixture(scope="module")
def e2e_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one SFT model and pair set for both runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["orpo", "kto_unpaired"])  # length-normalised with an NLL anchor; one side per pair
def test_run_py_trains_and_analyses_the_objective(name, e2e_cache, tmp_path):
    """`python run.py algo=<name>` on the embedded task (tiny sizes): a win rate, and alignment.csv with every
    component of the objective for every layer group and checkpoint, additive to 1e-4."""
    import json

    import pandas as pd

    from test_pipeline import run

    run_dir = tmp_path / name
    run(run_dir, e2e_cache, f"algo={name}", "logger=none")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == OBJECTIVES[name].label and 0 <= summary["win_rate"] <= 100
    table = pd.read_csv(run_dir / "alignment.csv")
    expected = BASE_COMPONENTS + OBJECTIVES[name].extra_components
    assert set(table["component"]) == set(expected) and set(table["layer_group"]) == {"all", "bottom", "middle", "top"}
    n_targets = table["target"].nunique()  # analysis.targets: D' and the default four others
    assert n_targets == 5 and table["step"].nunique() >= 3
    assert len(table) == table["step"].nunique() * n_targets * len(expected) * 4
    extras = list(OBJECTIVES[name].extra_components)
    for column in ("G", "G_unfiltered"):
        g = table.pivot_table(index=["step", "target", "layer_group"], columns="component", values=column)
        scale = g.abs().max(axis=1) + 1e-12
        rest = g[extras].sum(axis=1) if extras else 0.0
        assert ((g["POS"] + g["NEG"] + rest - g["TOT"]).abs() / scale).max() < 1e-4
        assert ((g["TOP"] + g["MID"] + g["BOT"] + rest - g["TOT"]).abs() / scale).max() < 1e-4
        assert (g[list(expected)].abs().max() > 0).all()  # every component measured, none identically zero
        by_group = table.pivot_table(index=["step", "target", "component"], columns="layer_group", values=column)
        scale = by_group.abs().max(axis=1) + 1e-12
        assert ((by_group[["bottom", "middle", "top"]].sum(axis=1) - by_group["all"]).abs() / scale).max() < 1e-4
    assert (run_dir / "figures" / "G_components.png").stat().st_size > 5000
