"""G (Eq. 3) for the DPO family: brute force per component, additivity, and its first-order meaning (Eq. 1-2)."""
from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from conftest import float64_checkpoint, make_pairs
from po_experiments.analysis.gradients import (
    DPO_COMPONENTS, choose_method, dpo_alignment, dpo_coefficients, dprime_gradient, encode, encode_pairs, flatten,
    iqr_outliers, layer_groups, sequence_logps, summarise,
)

ALGO = OmegaConf.create({"name": "dpo", "beta": 0.1})


@pytest.fixture
def setup(task, tokenizer, tiny_model):
    """A float64 'checkpoint' a little away from its reference, 12 pairs (3 mini-batches of 4) and 8 D' answers."""
    ref, model = float64_checkpoint(tiny_model)
    pairs = encode_pairs(tokenizer, make_pairs(task, 12, seed=1))
    with torch.no_grad():
        ref_logps = tuple(sequence_logps(ref, pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
                          for s in ("chosen", "rejected"))
    prompts = task.heldout_prompts(8)
    answers = [task.completion_text([int(w[1:]) for w in p.split()[1:-1]]) for p in prompts]
    dprime = [encode(tokenizer, prompts[i:i + 4], answers[i:i + 4]) for i in (0, 4)]
    return model, pairs, ref_logps, dprime


def test_layer_groups_partition_the_parameters(tiny_model):
    groups = layer_groups(tiny_model)
    assert list(groups) == [n for n, _ in tiny_model.named_parameters()]
    assert set(groups.values()) == {0, 1, 2}
    assert groups["gpt_neox.embed_in.weight"] == 0 and groups["lm_head.weight"] == 2


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
    return flat @ flatten(g), flat.norm()


def test_every_component_equals_brute_force(setup):
    model, pairs, ref_logps, dprime = setup
    g = dprime_gradient(model, dprime)
    mb = dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0, batch_size=4)
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
    G = dpo_alignment(model, pairs, ref_logps, dprime_gradient(model, dprime), ALGO, step=0).G
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
    G = summarise(dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0))["G_unfiltered"][
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
from po_experiments.objectives.policy_gradient import WEIGHTINGS  # noqa: E402


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
    return flat @ g.double()  # g: a flat vector here


def test_ppo_components_equal_brute_force_and_add_up(ppo_setup):
    model, rollout, dprime, coef = ppo_setup
    g = dprime_gradient(model, dprime)
    groups = layer_groups(model)
    mb = ppo_alignment(model, rollout, g, coef, batch_size=6)
    assert mb.G.shape[1:] == (6, 4) and torch.isfinite(mb.norms[:, 0]).all()
    idx = torch.arange(0, 6)
    for c, comp in enumerate(DPO_COMPONENTS):
        assert mb.G[0, c, 0].item() == pytest.approx(
            ppo_brute_force(model, rollout, flatten(g), coef[comp], idx).item(), rel=1e-6, abs=1e-12)
        bottom = flatten(g, 0, groups)
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
    mb = ppo_alignment(model, rollout, g, coef, batch_size=6)
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
    # a step small enough that the second-order term stays well under the 1 % tolerance (float64 model)
    before, eta = nll(), 1e-4 / max(p.grad.norm().item() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=eta).step()
    assert abs(G) > 0 and -(nll() - before) / eta == pytest.approx(G, rel=0.01)




# ============================================================================================== methods at scale
from po_experiments.analysis.ghost import SequenceGradientStats  # noqa: E402


def assert_same_alignment(got, ref, tol: float = 1e-5):
    """Every component x group G (relative to the largest |G|: TOT is a small difference of POS and NEG) and every
    component's gradient norm (relative, entry by entry)."""
    assert got.G.shape == ref.G.shape and got.norms.shape == ref.norms.shape
    assert torch.isfinite(got.norms).all()
    assert (got.G - ref.G).abs().max() <= tol * ref.G.abs().max()
    assert ((got.norms - ref.norms).abs() <= tol * ref.norms.abs()).all(), (got.norms, ref.norms)


@pytest.mark.parametrize("method, route", [("ghost", "auto"), ("ghost", "ghost"), ("ghost", "materialise"),
                                           ("jvp", "auto")])
def test_large_model_methods_equal_vmap(setup, method, route):
    """ghost (hooks, one backward) and jvp (forward mode per layer group): the vmap path's numbers, every component
    and layer group and every component's norm, whichever per-parameter route ghost takes."""
    model, pairs, ref_logps, dprime = setup
    g = dprime_gradient(model, dprime)
    via_vmap = dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0)
    got = dpo_alignment(model, pairs, ref_logps, g, ALGO, step=0, method=method, route=route)
    assert_same_alignment(got, via_vmap)
    assert all(p.requires_grad for p in model.parameters())  # the ghost pass gives them back


def random_rows(n, width, vocab, pad, gen):
    """Right-padded rows of random ids: ids, attention mask, completion mask (the last part of each row)."""
    ids = torch.randint(3, vocab, (n, width), generator=gen)
    lengths = torch.randint(width // 2, width + 1, (n,), generator=gen)
    pos = torch.arange(width)[None]
    mask = (pos < lengths[:, None]).long()
    comp = (mask.bool() & (pos >= 3)).long()
    return ids.masked_fill(mask == 0, pad), mask, comp


def other_architecture(name):
    """Random float64 models with what Pythia lacks: tied embeddings + RMSNorm + an embedding padding row (Llama,
    Qwen3), Conv1D + position embeddings (GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=24, pad_token_id=0, tie_word_embeddings=True)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**small))
    elif name == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**small, head_dim=4))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=3, n_head=4, pad_token_id=0))
    model = model.double().eval()
    model.config._attn_implementation = "eager"
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("route", ["ghost", "materialise"])
def test_ghost_statistics_on_other_architectures(arch, route):
    """Per-sequence g'_k . grad log pi and the Gram matrix against vmap'd per-sequence gradients, for tied weights
    (two calls of one parameter), RMSNorm, a padding row and Conv1D."""
    from po_experiments.analysis.gradients import _ghost_sequence_stats, _sequence_stats

    model = other_architecture(arch)
    gen = torch.Generator().manual_seed(2)
    ids, mask, comp = random_rows(6, 10, 40, 0, gen)
    ids[0, 1] = 0  # a padding id inside the text: Llama's embedding gives that row no gradient
    groups = layer_groups(model)
    g = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
    lp, dots, gram = _sequence_stats(model, ids, mask, comp, g, groups)
    lp2, dots2, gram2 = _ghost_sequence_stats(model, ids, mask, comp, g, groups, route=route)
    assert torch.allclose(lp2, lp, rtol=1e-10)
    assert (dots2 - dots).abs().max() <= 1e-9 * dots.abs().max()
    assert (gram2 - gram).abs().max() <= 1e-9 * gram.abs().max()


def test_ghost_refuses_what_it_would_get_wrong(tiny_model):
    """A parameter no formula covers (named), and activation checkpointing (it re-runs the forward hooks)."""
    tiny_model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="checkpointing"):
        SequenceGradientStats(tiny_model, None, layer_groups(tiny_model))
    tiny_model.gradient_checkpointing_disable()
    tiny_model.gpt_neox.layers[0].attention.register_parameter("scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match=r"gpt_neox\.layers\.0\.attention\.scale"):
        SequenceGradientStats(tiny_model, None, layer_groups(tiny_model))

    class Doubled(torch.nn.Linear):  # a Linear whose forward is not x W^T + b (as quantised / adapter layers)
        def forward(self, x):
            return 2 * super().forward(x)

    del tiny_model.gpt_neox.layers[0].attention.scale
    tiny_model.lm_head.__class__ = Doubled
    with pytest.raises(ValueError, match=r"lm_head\.weight \(Doubled\)"):
        SequenceGradientStats(tiny_model, None, layer_groups(tiny_model))


def test_forward_mode_runs_through_sdpa(setup):
    """Forward-mode AD has no formula for SDPA's fused kernels (CPU flash, CUDA flash / efficient): the jvp path
    forces the math backend, so an SDPA model gives eager attention's numbers."""
    from po_experiments.analysis.gradients import group_directional_derivatives, token_logps

    model, pairs, _, dprime = setup
    g = dprime_gradient(model, dprime)
    groups = layer_groups(model)
    ids, mask = pairs["chosen_ids"][:4], pairs["chosen_mask"][:4]
    eager = group_directional_derivatives(model, lambda p: token_logps(model, p, ids, mask), g, groups)
    model.config._attn_implementation = "sdpa"
    sdpa = group_directional_derivatives(model, lambda p: token_logps(model, p, ids, mask), g, groups)
    # 1e-6: eager attention takes its softmax in float32 even in a float64 model, SDPA's math backend does not
    assert (sdpa - eager).abs().max() <= 1e-6 * eager.abs().max()


def test_auto_method_by_size():
    assert choose_method("auto", 600_000, 2e7) == "vmap"
    assert choose_method("auto", 2_775_208_960, 2e7) == "ghost"
    assert choose_method("jvp", 600_000, 2e7) == "jvp" and choose_method("vmap", 10 ** 10, 2e7) == "vmap"


def test_ppo_all_component_norms_equal_brute_force(ppo_setup):
    """PPO: every component's mini-batch gradient norm from ghost passes with the token weights folded in."""
    from po_experiments.analysis.gradients import _response_logps

    model, rollout, dprime, coef = ppo_setup
    g = dprime_gradient(model, dprime)
    mb = ppo_alignment(model, rollout, g, coef, batch_size=6, all_norms=True)
    tot_only = ppo_alignment(model, rollout, g, coef, batch_size=6)
    assert torch.isnan(tot_only.norms[:, 1:]).all() and torch.equal(tot_only.G, mb.G)
    live = dict(model.named_parameters())
    for b, s in enumerate(range(0, rollout.valid.shape[0], 6)):
        idx = torch.arange(s, min(s + 6, rollout.valid.shape[0]))
        for c, comp in enumerate(DPO_COMPONENTS):
            lp = _response_logps(model, live, rollout, idx, 1.0).masked_fill(~rollout.valid[idx], 0.0)
            loss = (coef[comp][idx] * lp).sum() / rollout.valid[idx].sum()
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
            norm = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads if gr is not None))
            assert mb.norms[b, c].item() == pytest.approx(norm.item(), rel=1e-5, abs=1e-12)
        assert mb.norms[b, 0] == tot_only.norms[b, 0]


def test_stage_picks_the_method_by_size_and_ghost_gives_vmaps_numbers(setup, tmp_path):
    """The analysis stage on a saved checkpoint: `auto` is vmap for the tiny model and ghost above the threshold
    (run with SDPA attention, as the stage switches it); both give the same table."""
    from po_experiments.analysis.stage import analysis_method, load_model, minibatch_alignment

    model, pairs, ref_logps, dprime = setup
    model.float().save_pretrained(tmp_path / "ckpt")
    cfg = OmegaConf.create({"algo": {"family": "dpo", "name": "dpo", "beta": 0.1}, "deepspeed": {"config": None},
                            "analysis": {"method": "auto", "vmap_max_params": 2e7, "dtype": "float32",
                                         "dpo_batch_size": 4, "chunk": 32}})
    loaded = load_model(tmp_path / "ckpt", "float32")
    assert analysis_method(cfg, loaded) == "vmap"
    via_vmap = minibatch_alignment(cfg, 0, tmp_path / "ckpt", dprime, (pairs, ref_logps))
    cfg.analysis.vmap_max_params = 1000
    assert analysis_method(cfg, loaded) == "ghost"
    via_ghost = minibatch_alignment(cfg, 0, tmp_path / "ckpt", dprime, (pairs, ref_logps))
    assert_same_alignment(via_ghost, via_vmap, tol=1e-4)  # float32, and SDPA against eager attention


def test_tokens_without_output_gradient_are_dropped_exactly():
    """The output head's gradient is zero outside completions: those tokens are dropped before the per-row sums."""
    from po_experiments.analysis.ghost import _live_tokens

    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(3, 10, 4, generator=gen), torch.randn(3, 10, 5, generator=gen)
    g[0, :6] = 0
    g[1, 2:9] = 0
    g[2, ::2] = 0
    a2, g2 = _live_tokens(a, g, 3)
    assert a2.shape == (3, 5, 4) and g2.shape == (3, 5, 5)
    assert torch.allclose(torch.einsum("nto,nti->noi", g2, a2), torch.einsum("nto,nti->noi", g, a))
    dense = torch.randn(3, 10, 5, generator=gen)
    assert _live_tokens(a, dense, 3)[1].shape == dense.shape  # nothing to drop: left as it is


@pytest.mark.parametrize("override, ok", [("analysis.method=ghost", True), ("analysis.method=jvp", True),
                                          ("analysis.method=ghosts", False),
                                          ("analysis.vmap_max_params=-1", False)])
def test_analysis_method_keys_validate(override, ok):
    from test_config import make

    from po_experiments.config import validate
    from po_experiments.errors import ConfigError

    assert make().analysis.method == "auto"  # the default picks by size
    if ok:
        validate(make([override]))
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            validate(make([override]))


def test_ppo_minibatch_rows_drop_only_shared_padding(ppo):
    """A mini-batch of a large sample is cut to its own widths: the same response log-probs, fewer columns."""
    from po_experiments.analysis.gradients import _response_logps, trimmed_rows

    trainer = ppo()
    r = trainer.make_rollout(trainer.batch_for(1))
    model = trainer.accelerator.unwrap_model(trainer.model).policy.float().eval()
    prompt_len = r.attention_mask[:, :r.context_length].sum(1)
    idx = torch.argsort(prompt_len * 100 + r.valid.sum(1))[:4]  # short prompts and responses: padding to drop
    rows, width = trimmed_rows(r, idx)
    assert rows.query_responses.shape[1] < r.query_responses.shape[1]
    assert torch.equal(rows.valid, r.valid[idx, :width]) and not r.valid[idx, width:].any()
    params = dict(model.named_parameters())
    with torch.no_grad():
        full = _response_logps(model, params, r, idx, 0.7)[:, :width]
        cut = _response_logps(model, params, rows, slice(None), 0.7)
    assert torch.allclose(cut[rows.valid], full[rows.valid], atol=1e-5)
