"""Per-example attribution of G (analysis.attribution): each pair's (PPO: response's) share of every component's G
per target, from the per-sequence dots of the G pass. The shares add up to G, match a brute-force gradient of one
pair's term, and the ghost path (billion-parameter scale) gives the vmap path's shares."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from test_targets import ALGO, TARGETS, setup, target_sets  # noqa: F401  (fixture)
from po_experiments.analysis.gradients import (
    dpo_alignment, dpo_coefficients, flatten, iqr_outliers, sequence_logps, summarise, target_gradients,
)
from po_experiments.analysis.stage import attribution_rows


def with_an_outlier(mb, batch: int = 1):
    """The same alignment with mini-batch `batch`'s TOT norm made an IQR outlier (so filtering has work to do)."""
    mb.norms = mb.norms.clone()
    mb.norms[:, 0] = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.02][:len(mb.norms)], dtype=mb.norms.dtype)
    mb.norms[batch, 0] = 50.0
    return mb


@pytest.fixture
def alignment(setup):  # noqa: F811
    model, pairs, ref_logps, targets = setup
    g = target_gradients(model, targets)
    small = {k: v for k, v in pairs.items()}  # 12 pairs in mini-batches of 2: 6 mini-batches, one an outlier
    mb = dpo_alignment(model, small, ref_logps, g, ALGO, step=0, batch_size=2)
    return model, pairs, ref_logps, g, with_an_outlier(mb)


def test_shares_add_up_to_G_for_every_component_and_target(alignment):
    *_, mb = alignment
    s = summarise(mb)
    assert s["n_outliers"] == 1 and iqr_outliers(mb.norms[:, 0]).tolist() == s["outliers"].tolist()
    table = pd.DataFrame(attribution_rows(7, mb, s))
    assert len(table) == 12 * len(TARGETS) * len(mb.components)
    assert table["outlier_batch"].sum() == 2 * len(TARGETS) * len(mb.components)  # the outlier batch's 2 pairs
    kept = table[~table["outlier_batch"]].groupby(["target", "component"])["contribution"].sum()
    every = table.groupby(["target", "component"])["contribution"].sum()
    n_kept, n_batches = 5, 6
    for t, target in enumerate(mb.targets):
        for c, comp in enumerate(mb.components):
            G = s["G_filtered_targets"][t, c, 0].item()
            scale = s["G_filtered_targets"][t, :, 0].abs().max().item()
            assert kept[(target, comp)] == pytest.approx(G, abs=1e-10 * scale)
            assert every[(target, comp)] * n_kept / n_batches == pytest.approx(
                s["G_unfiltered_targets"][t, c, 0].item(), abs=1e-10 * scale)
    assert table.loc[table["component"] == "TOT", "contribution"].abs().max() > 0


def test_a_pairs_share_is_its_own_gradient_term(alignment):
    """Pair i's share = g'_t . grad (c+_i log pi(y+_i) + c-_i log pi(y-_i)) / batch size, by plain autograd."""
    model, pairs, ref_logps, g, mb = alignment
    with torch.no_grad():
        lp = [sequence_logps(model, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"]) for s in
              ("chosen", "rejected")]
    coef = dpo_coefficients(*lp, *ref_logps, ALGO, 0)
    params = list(model.parameters())
    for i, comp in ((3, "TOT"), (8, "NEG"), (10, "POS")):
        row = slice(i, i + 1)
        live = [sequence_logps(model, pairs[f"{s}_ids"][row], pairs[f"{s}_mask"][row], pairs[f"{s}_comp"][row])
                for s in ("chosen", "rejected")]
        term = (coef[comp][i] * live[0].sum() + coef[comp][12 + i] * live[1].sum()) / 2
        grads = torch.autograd.grad(term, params, allow_unused=True)
        flat = torch.cat([(gr if gr is not None else torch.zeros_like(p)).flatten() for gr, p in zip(grads, params)])
        c = mb.components.index(comp)
        for t in range(len(TARGETS)):
            expected = (flat @ flatten(g.one(t))).item()
            assert mb.examples[i, t, c].item() == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert mb.example_batch.tolist() == [i // 2 for i in range(12)]


@pytest.mark.parametrize("route", ["ghost", "materialise"])
def test_ghost_gives_vmaps_shares(alignment, route):
    model, pairs, ref_logps, g, ref = alignment
    got = dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0, batch_size=2, method="ghost", route=route)
    scale = ref.examples.abs().amax(dim=(0, 2), keepdim=True)
    assert ((got.examples - ref.examples).abs() <= 1e-6 * scale).all()
    assert torch.equal(got.example_batch, ref.example_batch)


def test_ppo_response_shares_add_up_to_each_minibatch(ppo, task, tokenizer):
    from po_experiments.analysis.gradients import ppo_alignment, ppo_token_coefficients
    from po_experiments.objectives.policy_gradient import WEIGHTINGS
    from test_targets import make_pairs

    trainer = ppo(prompt_words=5)
    rollout = trainer.make_rollout(trainer.batch_for(1))
    model = trainer.accelerator.unwrap_model(trainer.model).policy.eval()
    model.config._attn_implementation = "eager"
    g = target_gradients(model, target_sets(task, tokenizer, make_pairs(task, 6, seed=2)))
    coef = ppo_token_coefficients(rollout, trainer.algo, 1, WEIGHTINGS["ppo"])
    mb = ppo_alignment(model, rollout, g, coef, batch_size=6)
    assert mb.examples.shape == (rollout.valid.shape[0], len(TARGETS), len(mb.components))
    for b in range(len(mb.G)):
        summed = mb.examples[mb.example_batch == b].sum(0)  # targets x components
        scale = mb.G_targets[b, :, :, 0].abs().max()
        assert torch.allclose(summed, mb.G_targets[b, :, :, 0], atol=1e-10 * scale)


def test_examples_text_of_a_ppo_sample(ppo, tokenizer, tmp_path):
    from po_experiments.analysis.stage import EXAMPLES, add_ppo_examples

    trainer = ppo(prompt_words=5)
    rollout = trainer.make_rollout(trainer.batch_for(1))
    add_ppo_examples(tmp_path, 4, rollout, tokenizer)
    add_ppo_examples(tmp_path, 8, rollout, tokenizer)
    content = json.loads((tmp_path / EXAMPLES).read_text())
    assert content["family"] == "ppo" and set(content["steps"]) == {"4", "8"}
    first = content["steps"]["4"][0]
    valid = rollout.valid[0]
    assert first["response"] == tokenizer.decode(rollout.query_responses[0, rollout.context_length:][valid],
                                                 skip_special_tokens=True)
    assert first["advantage"] == pytest.approx(rollout.advantages[0][valid].double().mean().item())


def test_attribution_markdown_lists_the_top_examples():
    from po_experiments.reporting.targets import attribution_markdown

    rows = [{"step": s, "example": i, "component": "TOT", "target": "chosen", "contribution": v,
             "outlier_batch": i == 4} for s in (1, 2) for i, v in enumerate([0.5, -0.2, 0.1, -0.9, 9.0])]
    examples = {"family": "dpo", "examples": [{"index": i, "prompt": f"q{i}", "chosen": f"good{i}",
                                               "rejected": f"bad{i}"} for i in range(5)]}
    text = attribution_markdown("run", pd.DataFrame(rows), examples, "dpo")
    lines = [line for line in text.splitlines() if line.startswith("| TOT")]
    ups = [line for line in lines if "| up |" in line]
    downs = [line for line in lines if "| down |" in line]
    assert "q0" in ups[0] and "q2" in ups[1] and len(ups) == 2  # the outlier batch's 9.0 is left out
    assert "q3" in downs[0] and "good3" in downs[0] and len(downs) == 2
