"""G against several targets (analysis.targets): the stacked pass equals one pass per target, every method agrees,
G's first-order meaning holds for every target (one SGD step), the config is validated, old tables still read,
and the report's first-order correlation is Pearson's r of the right points."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import float64_checkpoint, make_pairs
from po_experiments.analysis.gradients import (
    dpo_alignment, dpo_coefficients, encode, encode_pairs, sequence_logps, summarise,
    target_gradients,
)

ALGO = OmegaConf.create({"name": "dpo", "beta": 0.1})
TARGETS = ("dprime", "chosen", "rejected", "sft", "unrelated")


def batches_of(tokenizer, prompts, answers, size=4):
    return [encode(tokenizer, prompts[i:i + size], answers[i:i + size]) for i in range(0, len(prompts), size)]


def target_sets(task, tokenizer, pairs_text):
    """Five targets as the stage builds them: D' (right answers), the sample's y+ / y-, other answers to the D'
    questions ("sft") and the same answers rotated by one ("unrelated")."""
    prompts = task.heldout_prompts(8)
    right = [task.completion_text(task.parse_prompt(p)) for p in prompts]
    other = [task.completion_text(task.parse_prompt(p)[::-1]) for p in prompts]
    n = 6
    return {"dprime": batches_of(tokenizer, prompts, right),
            "chosen": batches_of(tokenizer, list(pairs_text["prompt"][:n]), list(pairs_text["chosen"][:n])),
            "rejected": batches_of(tokenizer, list(pairs_text["prompt"][:n]), list(pairs_text["rejected"][:n])),
            "sft": batches_of(tokenizer, prompts, other),
            "unrelated": batches_of(tokenizer, prompts, other[1:] + other[:1])}


@pytest.fixture
def setup(task, tokenizer, tiny_model):
    ref, model = float64_checkpoint(tiny_model)
    text = make_pairs(task, 12, seed=1)
    pairs = encode_pairs(tokenizer, text)
    with torch.no_grad():
        ref_logps = tuple(sequence_logps(ref, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
                          for s in ("chosen", "rejected"))
    return model, pairs, ref_logps, target_sets(task, tokenizer, text)


def mean_logp(model, batches) -> float:
    with torch.no_grad():
        return sum(sequence_logps(model, *b).sum().item() for b in batches) / sum(len(b[0]) for b in batches)


def test_stacked_targets_equal_one_pass_per_target(setup):
    """One pass with all five g' stacked gives, per target, exactly the G of a pass with that target alone; the
    targets' mean log-likelihoods come with it."""
    model, pairs, ref_logps, targets = setup
    g = target_gradients(model, targets)
    assert g.names == TARGETS and g.grads["lm_head.weight"].shape[0] == 5
    together = dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0)
    assert together.G_targets.shape == (3, 5, 6, 4) and torch.equal(together.G, together.G_targets[:, 0])
    for t, name in enumerate(TARGETS):
        alone = dpo_alignment(model, pairs, ref_logps, g.one(t), ALGO, step=0)
        assert torch.allclose(together.G_targets[:, t], alone.G, rtol=1e-9, atol=1e-12 * alone.G.abs().max())
        assert g.logp[name] == pytest.approx(mean_logp(model, targets[name]), rel=1e-9)
    assert len({round(v, 6) for v in g.logp.values()}) == 5  # five different targets, not one five times


@pytest.mark.parametrize("method, route", [("ghost", "auto"), ("ghost", "materialise"), ("jvp", "auto")])
def test_every_method_gives_vmaps_numbers_for_every_target(setup, method, route):
    model, pairs, ref_logps, targets = setup
    g = target_gradients(model, targets)
    ref = dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0)
    got = dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0, method=method, route=route)
    scale = ref.G_targets.abs().amax(dim=(0, 2, 3), keepdim=True)  # per target
    assert ((got.G_targets - ref.G_targets).abs() <= 1e-6 * scale).all()
    assert torch.allclose(got.norms, ref.norms, rtol=1e-6)


def test_first_order_meaning_for_every_target(setup):
    """One SGD step (float64, small lr) on the G sample's DPO loss: each target's mean log-likelihood changes by
    lr * G_TOT(target) to first order."""
    model, pairs, ref_logps, targets = setup
    g = target_gradients(model, targets)
    G = summarise(dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0))["G_unfiltered_targets"][:, 0, 0]
    before = {t: mean_logp(model, b) for t, b in targets.items()}
    with torch.no_grad():
        lp = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
              for s in ("chosen", "rejected")]
    coef = dpo_coefficients(*lp, *ref_logps, ALGO, 0)["TOT"]
    live = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
            for s in ("chosen", "rejected")]
    model.zero_grad()
    ((coef[:12] * live[0]).sum() + (coef[12:] * live[1]).sum()).div(12).backward()  # = the mean of the 3 batches'
    eta = 1e-3 / max(p.grad.norm().item() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=eta).step()
    scale = G.abs().max().item()
    for t, name in enumerate(TARGETS):
        measured = (mean_logp(model, targets[name]) - before[name]) / eta
        assert abs(G[t].item()) > 1e-3 * scale
        assert measured == pytest.approx(G[t].item(), rel=0.01, abs=1e-3 * scale), name


def test_ppo_first_order_meaning_for_every_target(ppo, task, tokenizer):
    """The PPO family: one SGD step on the policy loss of a rollout; every target's log-likelihood moves by
    lr * G_TOT(target)."""
    from po_experiments.analysis.gradients import _response_logps, ppo_alignment, ppo_token_coefficients
    from po_experiments.objectives.policy_gradient import WEIGHTINGS

    trainer = ppo(prompt_words=5)
    rollout = trainer.make_rollout(trainer.batch_for(1))
    model = trainer.accelerator.unwrap_model(trainer.model).policy.eval()
    model.config._attn_implementation = "eager"
    targets = target_sets(task, tokenizer, make_pairs(task, 6, seed=2))
    coef = ppo_token_coefficients(rollout, trainer.algo, 1, WEIGHTINGS["ppo"])
    g = target_gradients(model, targets)
    mb = ppo_alignment(model, rollout, g, coef, batch_size=6)
    G = mb.G_targets[:, :, 0, 0].mean(0)
    before = {t: mean_logp(model, b) for t, b in targets.items()}
    model.zero_grad()
    live = dict(model.named_parameters())
    n = rollout.valid.shape[0]
    total = 0
    for s in range(0, n, 6):
        idx = torch.arange(s, min(s + 6, n))
        lp = _response_logps(model, live, rollout, idx, 1.0).masked_fill(~rollout.valid[idx], 0.0)
        total = total + (coef["TOT"][idx] * lp).sum() / rollout.valid[idx].sum()
    (total / len(range(0, n, 6))).backward()
    eta = 1e-4 / max(p.grad.norm().item() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=eta).step()
    scale = G.abs().max().item()
    for t, name in enumerate(TARGETS):
        measured = (mean_logp(model, targets[name]) - before[name]) / eta
        assert measured == pytest.approx(G[t].item(), rel=0.02, abs=2e-3 * scale), name


# ============================================================================================== config and tables


@pytest.mark.parametrize("override, ok", [("analysis.targets=[dprime]", True),
                                          ("analysis.targets=[dprime,sft]", True),
                                          ("analysis.targets=[chosen,rejected]", False),
                                          ("analysis.targets=[dprime,squeeze]", False),
                                          ("analysis.targets=[dprime,sft,sft]", False),
                                          ("analysis.n_target=0", False)])
def test_targets_validate_at_composition(override, ok):
    from test_config import make

    from po_experiments.config import validate
    from po_experiments.errors import ConfigError

    assert list(make().analysis.targets) == list(TARGETS) and make().analysis.n_target == 64
    if ok:
        validate(make([override]))
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            validate(make([override]))


def test_an_old_table_reads_as_dprime_and_resumes(tmp_path):
    """A table of before the target column: paper_target keeps every row; rows appended by a resumed analysis
    mark the old ones dprime, so the paper's figures still see every checkpoint."""
    from po_experiments.analysis.plots import load_alignment
    from po_experiments.analysis.stage import append_rows
    from po_experiments.analysis.tables import paper_target

    old = pd.DataFrame({"step": [4, 4], "component": ["TOT", "POS"], "layer_group": "all", "G": [1.0, 2.0],
                        "loss_increased": False})
    path = tmp_path / "alignment.csv"
    old.to_csv(path, index=False)
    assert len(paper_target(pd.read_csv(path))) == 2
    new = [{"step": 8, "component": c, "layer_group": "all", "target": t, "G": 3.0, "loss_increased": False}
           for t in ("dprime", "chosen") for c in ("TOT", "POS")]
    table = append_rows(path, new)
    assert set(table.loc[table["step"] == 4, "target"]) == {"dprime"}
    d = load_alignment(tmp_path)
    assert sorted(d["step"].tolist()) == [4, 4, 8, 8] and set(d["target"]) == {"dprime"}
    assert len(load_alignment(tmp_path, all_targets=True)) == 6


def test_wandb_metrics_per_target():
    from po_experiments.analysis.stage import wandb_metrics

    rows = [{"step": 3, "component": "TOT", "layer_group": "all", "target": t, "G": g, "G_unfiltered": g,
             "target_logp": -g} for t, g in (("dprime", 1.0), ("chosen", 2.0))]
    m = wandb_metrics(rows)
    assert m["alignment/G/TOT"] == 1.0  # the paper's G, as before
    assert m["alignment/G_target/chosen/TOT"] == 2.0 and m["alignment/target_logp/chosen"] == -2.0


# ============================================================================================== report


def test_first_order_correlation_over_checkpoints_and_targets():
    from po_experiments.reporting.targets import correlation_table, first_order_points

    rng = np.random.default_rng(0)
    rows = []
    for target in ("dprime", "chosen"):
        logp = 0.0
        for step in (10, 20, 40):
            g = rng.normal()
            rows.append({"step": step, "component": "TOT", "layer_group": "all", "target": target,
                         "G_unfiltered": g, "G": 0.0, "target_logp": logp})
            rows.append({"step": step, "component": "POS", "layer_group": "all", "target": target,
                         "G_unfiltered": 99.0, "G": 0.0, "target_logp": logp})
            logp += g * 1e-3 * (20 if step == 20 else 10)  # the next checkpoint is 20 steps on after step 20
    table = pd.DataFrame(rows)
    points = first_order_points(table)
    assert len(points) == 4 and set(points["target"]) == {"dprime", "chosen"}
    assert np.allclose(points["measured"], points["predicted"] * 1e-3)  # TOT rows, G x (s' - s)
    corr = correlation_table([({"model": "tiny", "family": "dpo", "method": "DPO", "seed": 0, "run": "a"}, table)])
    run, pooled = corr.iloc[0], corr.iloc[1]
    assert run["scope"] == "run" and run["pearson_r"] == pytest.approx(1.0) and run["n_points"] == 4
    assert pooled["scope"] == "pooled" and run["sign_agreement"] == 1.0
    flipped = table.assign(target_logp=-table["target_logp"])
    r = correlation_table([({"model": "tiny", "family": "dpo"}, flipped)]).iloc[0]["pearson_r"]
    assert r == pytest.approx(-1.0)
    assert math.isnan(correlation_table([({}, table[table["step"] < 40])]).iloc[0]["pearson_r"])  # 2 points


def test_batched_forward_mode_over_targets_equals_one_pass_per_target(setup):
    """PPO / jvp: the T targets' tangents vmapped in one forward-mode pass per layer group give the loop's numbers."""
    from po_experiments.analysis.gradients import layer_groups, target_directional_derivatives, token_logps

    model, pairs, _, targets = setup
    g = target_gradients(model, targets)
    ids, mask = pairs["chosen_ids"][:4], pairs["chosen_mask"][:4]
    fn = lambda p: token_logps(model, p, ids, mask)  # noqa: E731
    groups = layer_groups(model)
    batched = target_directional_derivatives(model, fn, g, groups)
    looped = target_directional_derivatives(model, fn, g, groups, batched=False)
    assert batched.shape == (5, 3, *ids[:, 1:].shape)
    assert torch.allclose(batched, looped, rtol=1e-9, atol=1e-12 * looped.abs().max())


def test_one_pass_per_target_gives_the_stacked_numbers(setup, tmp_path):
    """analysis.targets_pass=per_target (one g' in memory at a time) and stacked: the same alignment at a saved
    checkpoint, every target, its log-likelihood and every pair's share."""
    from po_experiments.analysis.stage import minibatch_alignment, stacked_targets

    model, pairs, ref_logps, targets = setup
    model.float().save_pretrained(tmp_path / "ckpt")
    cfg = OmegaConf.create({"algo": {"family": "dpo", "name": "dpo", "beta": 0.1}, "deepspeed": {"config": None},
                            "analysis": {"method": "vmap", "vmap_max_params": 2e7, "dtype": "float32",
                                         "dpo_batch_size": 4, "chunk": 32, "targets_pass": "stacked"}})
    stacked = minibatch_alignment(cfg, 0, tmp_path / "ckpt", targets, (pairs, ref_logps))
    cfg.analysis.targets_pass = "per_target"
    assert not stacked_targets(cfg, model, 5)
    one_by_one = minibatch_alignment(cfg, 0, tmp_path / "ckpt", targets, (pairs, ref_logps))
    assert one_by_one.targets == stacked.targets == TARGETS
    assert torch.allclose(one_by_one.G_targets, stacked.G_targets, rtol=1e-5, atol=1e-6 * stacked.G.abs().max())
    assert torch.allclose(one_by_one.examples, stacked.examples, rtol=1e-5, atol=1e-6 * stacked.examples.abs().max())
    assert one_by_one.target_logp == pytest.approx(stacked.target_logp, rel=1e-6)
    cfg.analysis.targets_pass = "auto"
    assert stacked_targets(cfg, model, 5)  # CPU: stacked
