"""Every registered policy-gradient objective (family "ppo"): components that add up, G coefficients that are the
loss gradient, the estimators' formulas (GRPO, DAPO, RLOO, REINFORCE++), TRL's GRPO loss, and an end-to-end run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from po_experiments.analysis.gradients import ppo_token_coefficients
from po_experiments.objectives import OBJECTIVES, components_of
from po_experiments.objectives.policy_gradient import (
    WEIGHTINGS, aggregation_weights, clipped_surrogate, kl_active, response_thirds, settings, surrogate_loss,
    thirds_of, token_mask,
)
from po_experiments.trainers.ppo import Rollout

PG_OBJECTIVES = sorted(n for n, o in OBJECTIVES.items() if o.family == "ppo")
REPO = Path(__file__).resolve().parents[1]


def algo_of(name: str, *overrides: str):
    """conf/algo/<name>.yaml composed with the tiny model (its cPPO/hPPO cases), as a run gets it."""
    from test_config import make

    return make([f"algo={name}", *overrides]).algo


def synthetic_rollout(k: int, seed: int = 0, prompts: int = 4, length: int = 7, uniform_group: bool = False):
    """A rollout of prompts x k responses with random behaviour / reference log-probs, values, scores (scores of one
    group all equal when `uniform_group`), response lengths 1..length (float64)."""
    g = torch.Generator().manual_seed(seed)
    b, ctx = prompts * k, 2
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    valid = torch.arange(length)[None] < lengths[:, None]
    logprobs = -torch.rand(b, length, generator=g, dtype=torch.float64) * 3
    ref = logprobs + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    if uniform_group:
        scores[:k] = 0.5
    zero = torch.zeros(b, length, dtype=torch.float64)
    ids = torch.randint(3, 20, (b, ctx + length), generator=g)
    return Rollout(ids, torch.cat([torch.ones(b, ctx, dtype=torch.long), valid.long()], 1), ctx,
                   logprobs.masked_fill(~valid, 0), ref.masked_fill(~valid, 0),
                   torch.randn(b, length, generator=g, dtype=torch.float64).masked_fill(~valid, 0), valid, scores,
                   rewards=zero, raw_advantages=zero.clone(), advantages=zero.clone(), returns=zero.clone())


def estimated(name: str, algo, **kw):
    a = settings(algo)
    k = a.group_size if OBJECTIVES[name].fn.needs_groups else 1
    return OBJECTIVES[name].fn(synthetic_rollout(k, **kw), a)


def component_loss(r, new, algo, comp, step=3, batch_tokens=None):
    """The trainer's loss (`surrogate_loss`) restricted to one component, on the whole rollout."""
    a = settings(algo)
    thirds = thirds_of(r.advantages, r.valid, algo)
    weights, _ = WEIGHTINGS[algo.weighting](r.advantages, thirds, step, algo)
    mask = token_mask([comp], [], r.advantages, thirds, r.valid)
    loss, _ = surrogate_loss(new, r.logprobs, r.ref_logprobs, r.advantages, r.valid, weights, mask, a,
                             kl_on=a.kl_in == "loss" and kl_active([comp], []), max_len=r.valid.shape[1],
                             batch_tokens=batch_tokens)
    return loss


# ================================================================================ 1. invariants over the registry


@pytest.mark.parametrize("weighting", ["ppo", *(pytest.param(w, marks=pytest.mark.slow)  # the fast tier: plain
                                                 for w in sorted(WEIGHTINGS) if w != "ppo")])  # every registered one
@pytest.mark.parametrize("name", PG_OBJECTIVES)
def test_components_add_up_and_coefficients_are_the_loss_gradient(name, weighting):
    algo = algo_of(name, f"algo.weighting={weighting}", "algo.lam=0.3", "algo.t3=2", "algo.tau=0.08")
    r = estimated(name, algo, seed=1)
    assert r.valid.any() and r.advantages[r.valid].abs().max() > 0
    comps = components_of(algo)
    assert ("KL" in comps) == (name == "grpo")
    g = torch.Generator().manual_seed(2)
    off = (r.logprobs + 0.3 * torch.randn(r.logprobs.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    grads = {c: torch.autograd.grad(component_loss(r, off, algo, c), off)[0] for c in comps}
    extra = [grads[c] for c in comps if c == "KL"]
    for parts in (("POS", "NEG"), ("TOP", "MID", "BOT")):
        total = sum(grads[c] for c in parts) + sum(extra)
        assert torch.allclose(total, grads["TOT"], rtol=1e-12, atol=1e-15), parts
    for c in comps[1:]:  # every part carries gradient and is not the whole
        assert grads[c].abs().max() > 1e-8 and (grads[c] - grads["TOT"]).abs().max() > 1e-8, c
    # at ratio 1 the G coefficients (per mini-batch, the same aggregation) are the loss gradient w.r.t. log pi
    at_one = r.logprobs.clone().requires_grad_(True)
    coef = ppo_token_coefficients(r, algo, 3, WEIGHTINGS[weighting])
    assert tuple(coef) == comps
    norm = aggregation_weights(r.valid, settings(algo).loss_aggregation, max_len=r.valid.shape[1])
    for c in comps:
        grad = torch.autograd.grad(component_loss(r, at_one, algo, c), at_one)[0]
        assert torch.allclose(coef[c] * norm, grad, rtol=1e-10, atol=1e-14), c


# ================================================================================ 2. the estimators


def test_grpo_advantages_are_group_standardised_and_constant_per_response():
    algo = algo_of("grpo")
    k = settings(algo).group_size
    r = estimated("grpo", algo, seed=3)
    per_response = r.advantages[torch.arange(len(r.valid)), 0]
    assert torch.all(r.advantages == per_response[:, None].expand_as(r.advantages).masked_fill(~r.valid, 0))
    groups = per_response.view(-1, k)
    assert torch.allclose(groups.mean(1), torch.zeros(len(groups), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(groups.std(1), torch.ones(len(groups), dtype=torch.float64), rtol=1e-3)  # std + 1e-4
    scores = r.scores.view(-1, k)
    assert torch.allclose(groups, (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4))
    unscaled = estimated("grpo", algo_of("grpo", "algo.scale_rewards=false"), seed=3)  # Dr-GRPO
    assert torch.allclose(unscaled.advantages[:, 0].view(-1, k), scores - scores.mean(1, keepdim=True))


def test_rloo_leave_one_out_by_brute_force():
    algo = algo_of("rloo")
    a = settings(algo)
    r = estimated("rloo", algo, seed=4)
    k, beta = a.group_size, a.kl_coef
    lp, ref, valid = r.logprobs.tolist(), r.ref_logprobs.tolist(), r.valid.tolist()
    rewards = [r.scores[i].item() - beta * sum(lp[i][t] - ref[i][t] for t in range(len(lp[i])) if valid[i][t])
               for i in range(len(lp))]
    for i in range(len(lp)):
        group = range(i // k * k, i // k * k + k)
        expected = rewards[i] - sum(rewards[j] for j in group if j != i) / (k - 1)
        got = [x for x, v in zip(r.advantages[i].tolist(), valid[i]) if v]
        assert got == pytest.approx([expected] * len(got), rel=1e-12, abs=1e-12)
    assert beta > 0 and r.rewards.sum(1).tolist() == pytest.approx(rewards, rel=1e-12)  # KL in the reward


def test_reinforce_pp_return_to_go_of_kl_penalised_rewards_whitened_over_the_batch():
    algo = algo_of("reinforce_pp")
    beta = settings(algo).kl_coef
    r = estimated("reinforce_pp", algo, seed=5)
    assert r.valid.shape[0] == 4  # no groups
    rows = []
    for lp, ref, valid, score in zip(r.logprobs.tolist(), r.ref_logprobs.tolist(), r.valid.tolist(),
                                     r.scores.tolist()):
        n = sum(valid)
        rewards = [-beta * (lp[t] - ref[t]) for t in range(n)]
        rewards[-1] += score
        rows.append([sum(rewards[t:]) for t in range(n)])  # gamma = 1
    flat = torch.tensor([x for row in rows for x in row], dtype=torch.float64)
    mean, std = flat.mean().item(), math.sqrt(flat.var(unbiased=True).item() + 1e-8)
    for row, got, valid in zip(rows, r.advantages.tolist(), r.valid.tolist()):
        assert got[:len(row)] == pytest.approx([(x - mean) / std for x in row], rel=1e-10, abs=1e-12)
        assert all(g == 0 for g, v in zip(got, valid) if not v)
    no_kl = OBJECTIVES["reinforce_pp"].fn(synthetic_rollout(1, seed=5), settings(algo, kl_coef=0.0))
    assert (no_kl.raw_advantages - r.raw_advantages).abs().max() > 1e-6  # the KL penalty is in the reward


def test_dapo_dynamic_sampling_drops_the_groups_with_equal_scores():
    algo = algo_of("dapo")
    k = settings(algo).group_size
    r = estimated("dapo", algo, seed=6, uniform_group=True)
    assert r.dropped_groups == 1
    assert not r.valid[:k].any() and r.valid[k:].any(1).all()  # the uniform group left the batch
    assert torch.all(r.advantages[:k] == 0)
    keep = estimated("dapo", algo_of("dapo", "algo.dynamic_sampling=false"), seed=6, uniform_group=True)
    assert keep.dropped_groups == 0 and keep.valid[:k].any()
    assert torch.equal(keep.advantages[k:], r.advantages[k:])
    # the dropped tokens count in no normaliser and no third
    assert torch.all(thirds_of(r.advantages, r.valid, algo)[:k] == -1)


def test_dapo_clip_higher_is_asymmetric():
    low, high = 0.2, 0.28
    ratios = torch.tensor([1.25, 1.30, 0.81, 0.79], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    new = ratios.log().requires_grad_(True)
    loss = clipped_surrogate(new, torch.zeros(4, dtype=torch.float64), adv, low, high).sum()
    grad = torch.autograd.grad(loss, new)[0]
    # A > 0: unclipped up to 1 + 0.28 (a symmetric 0.2 would clip 1.25); A < 0: clipped below 1 - 0.2
    assert grad.tolist() == pytest.approx([-1.25, 0.0, 0.81, 0.0])
    symmetric = torch.autograd.grad(clipped_surrogate(new, torch.zeros(4, dtype=torch.float64), adv, low).sum(),
                                    new)[0]
    assert symmetric[0] == 0.0


def test_per_response_thirds_rank_responses_by_advantage():
    adv = torch.tensor([[0.1] * 3, [-2.0] * 3, [0.5] * 3, [3.0] * 3, [-0.2] * 3, [1.0] * 3], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    thirds = response_thirds(adv, valid)
    assert [int(t[0]) for t in thirds] == [0, 2, 1, 2, 0, 1]  # |A|: .1 .2 | .5 1 | 2 3
    assert torch.all(thirds[~valid] == -1) and all(len(set(t[v].tolist())) == 1 for t, v in zip(thirds, valid))
    assert torch.equal(thirds_of(adv, valid, OmegaConf.create({"name": "grpo"})), thirds)
    assert not torch.equal(thirds_of(adv, valid, OmegaConf.create({"name": "reinforce_pp"})), thirds)


@pytest.mark.parametrize("name,k", [("grpo", 8), ("rloo", 4), ("reinforce_pp", 1), ("ppo", 1)])
def test_run_length_counts_responses_per_update(name, k):
    from test_config import make

    from po_experiments import run_length

    cfg = make([f"algo={name}", "model.ppo.batch_size=64", "model.ppo.epochs=1", "model.ppo.save_steps=0"])
    assert run_length.group_size(cfg) == k
    assert run_length.total_steps(cfg, 1000) == math.ceil(1000 * k / 64)  # 64 / k prompts per update
    if k > 1:
        from po_experiments.errors import ConfigError

        with pytest.raises(ConfigError, match=r"model\.ppo\.batch_size"):
            run_length.check(make([f"algo={name}", f"model.ppo.batch_size={k + 1}"]), 1000, where="test")


@pytest.mark.parametrize("overrides,key", [
    (["algo=grpo", "algo.group_size=1"], "algo.group_size"),
    (["algo=dapo", "algo.epsilon_high=1.2"], "algo.epsilon_high"),
    (["algo=grpo", "algo.kl_in=reward"], "algo.kl_in"),
    (["algo=rloo", "algo.kl_in=loss"], "algo.kl_in"),
    (["algo=grpo", "algo.loss_aggregation=mean"], "algo.loss_aggregation"),
    (["algo=reinforce_pp", "algo.dynamic_sampling=true"], "algo.dynamic_sampling"),
])
def test_schema_ranges_name_their_key(overrides, key):
    from test_config import make

    from po_experiments.config import validate
    from po_experiments.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make(overrides))


@pytest.mark.parametrize("name,label", [("grpo", "GRPO"), ("dapo", "DAPO"), ("rloo", "RLOO"),
                                        ("reinforce_pp", "REINFORCE++")])
def test_yaml_holds_the_schemas_defaults_so_runs_are_labelled_plainly(name, label):
    from test_config import make

    from po_experiments.reporting.methods import describe

    cfg = make([f"algo={name}"])
    assert describe(cfg)["method"] == label
    assert describe(make([f"algo={name}", "algo.weighting=cppo_top", "algo.lam=0.3"]))["method"].startswith(label)
    assert not hasattr(OmegaConf.structured(OBJECTIVES["ppo"].schema), "group_size")  # PPO's section as it was


# ================================================================================ 3. TRL's GRPO loss


def trl_grpo_loss(loss_type, new, old, ref, adv, mask, beta, eps_low, eps_high, max_len):
    """TRL 1.12 GRPOTrainer._compute_loss, called unbound on a stub with the attributes it reads (eval mode: no
    gradient-accumulation scaling), the policy's per-token log-probs handed in through its forward hook."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    class Accelerator:
        num_processes, sync_gradients = 1, True

        def reduce(self, x, reduction="sum"):
            return x

        def gather(self, x):
            return x

        gather_for_metrics = gather

    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (new, torch.zeros_like(new), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=Accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    b, t = new.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum().double()}
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("loss_type,aggregation,beta", [
    ("grpo", "grpo", 0.04), ("dapo", "dapo", 0.04), ("dapo", "dapo", 0.0), ("dr_grpo", "dr_grpo", 0.04),
    ("bnpo", "token_mean", 0.04),
])
def test_our_loss_gradient_equals_trls_grpo_loss(loss_type, aggregation, beta):
    g = torch.Generator().manual_seed(7)
    b, t, max_len = 8, 6, 9
    mask = torch.arange(t)[None] < torch.randint(1, t + 1, (b,), generator=g)[:, None]
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    ref = old + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    new0 = old + 0.25 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    eps_low, eps_high = 0.2, 0.28
    ratio = (new0 - old).exp()[mask]
    assert ((ratio > 1 + eps_high) | (ratio < 1 - eps_low)).any()  # clipping is exercised

    new = new0.clone().requires_grad_(True)
    theirs = torch.autograd.grad(trl_grpo_loss(loss_type, new, old, ref, adv, mask, beta, eps_low, eps_high,
                                               max_len), new)[0]
    a = settings(OmegaConf.create({"name": "grpo"}), kl_coef=beta, kl_in="loss", loss_aggregation=aggregation,
                 epsilon_low=eps_low, epsilon_high=eps_high)
    ours_new = new0.clone().requires_grad_(True)
    ones = torch.ones_like(old)
    loss, _ = surrogate_loss(ours_new, old, ref, adv[:, None].expand(b, t), mask, ones, mask.double(), a,
                             kl_on=beta > 0, max_len=max_len)
    ours = torch.autograd.grad(loss, ours_new)[0]
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert theirs.norm() > 0 and rel < 1e-6, rel


# ================================================================================ 4. end to end


FAST = ["data.n_sft=2000", "model.sft.max_steps=40", "data.n_pref_prompts=300", "data.n_heldout=60",
        "runtime.threads=1", "analysis.n_pairs=24", "analysis.n_dprime=12", "model.ppo.batch_size=16",
        "model.ppo.max_steps=4", "model.ppo.save_steps=2", "model.ppo.logging_steps=1", "logger=none",
        "eval.n_prompts=16", "eval.n_samples=2"]


@pytest.mark.slow  # SFT + PO + G + win rate through run.py
@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_run_py_trains_decomposes_and_measures_a_critic_free_objective(name, tmp_path):
    import pandas as pd

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PO_CACHE_DIR": str(tmp_path / "cache")}
    run_dir = tmp_path / name
    group = ["algo.group_size=4"] if name == "grpo" else []
    proc = subprocess.run([sys.executable, "run.py", f"algo={name}", *FAST, *group, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["win_rate"] is not None
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == [2, 4]
    for s in steps:
        folder = run_dir / "checkpoints" / f"step-{s}"
        assert not (folder / "value").exists()  # no critic: no value model saved
        rollout = torch.load(folder / "rollout.pt", weights_only=True)
        assert rollout["valid"].shape[0] == 16 and torch.all(rollout["values"] == 0)
        adv = rollout["advantages"]
        assert torch.all(adv == adv[:, :1].expand_as(adv).masked_fill(~rollout["valid"], 0))  # per response
    table = pd.read_csv(run_dir / "alignment.csv")
    comps = ["TOT", "POS", "NEG", "TOP", "MID", "BOT"] + (["KL"] if name == "grpo" else [])
    assert sorted(table["component"].unique()) == sorted(comps) and sorted(table["step"].unique()) == steps
    for column in ("G", "G_unfiltered"):
        g = table.pivot_table(index=["step", "target", "layer_group"], columns="component", values=column)
        kl = g["KL"] if name == "grpo" else 0.0
        scale = g.abs().max(axis=1) + 1e-12
        assert ((g["POS"] + g["NEG"] + kl - g["TOT"]).abs() / scale).max() < 1e-4
        assert ((g["TOP"] + g["MID"] + g["BOT"] + kl - g["TOT"]).abs() / scale).max() < 1e-4
        by_group = table.pivot_table(index=["step", "target", "component"], columns="layer_group", values=column)
        scale = by_group.abs().max(axis=1) + 1e-12
        assert ((by_group[["bottom", "middle", "top"]].sum(axis=1) - by_group["all"]).abs() / scale).max() < 1e-4
    if name == "grpo":
        assert table.loc[table.component == "KL", "G"].abs().max() > 0


# ================================================================================ the trainer without a critic


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_critic_free_trainer_samples_groups_and_has_no_value_model(ppo, name, tmp_path):
    """model.ppo.batch_size counts responses: 16 rows = 4 prompts x 4; no value model anywhere; a checkpoint holds
    none and a resumed run ends where an uninterrupted one does."""
    algo = {"name": name, "group_size": 4, "kl_in": "loss" if name == "grpo" else "reward",
            "loss_aggregation": "grpo" if name == "grpo" else "dapo", "epsilon_high": 0.28,
            "dynamic_sampling": name == "dapo"}
    trainer = ppo(algo=algo, save_steps=1)
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    assert wrapper.value_model is None and trainer.prompts_per_update == 4
    policy_params = {id(p) for p in wrapper.policy.parameters()}
    assert all(id(p) in policy_params for group in trainer.optimizer.param_groups for p in group["params"])
    batch = trainer.batch_for(1)
    queries = batch["input_ids"].view(4, 4, -1)
    assert torch.all(queries == queries[:, :1])  # each prompt k times in a row
    r = trainer.make_rollout(batch)
    assert r.valid.shape[0] == 16 and torch.all(r.values == 0)
    metrics = trainer.update(r, step=0)
    assert metrics["ppo/value"] == 0.0 and math.isfinite(metrics["ppo/policy"])
    if name == "grpo":
        assert metrics["ppo/kl_k3"] >= 0
    straight = ppo(algo=algo)
    straight.args.num_total_batches = 2
    straight.train()
    first = ppo(algo=algo, save_steps=1)
    first.args.num_total_batches = 1
    first.train()
    assert not (tmp_path / "checkpoints" / "step-1" / "value").exists()
    resumed = ppo(algo=algo, save_steps=1)
    resumed.args.num_total_batches = 2
    resumed.train(resume_from=tmp_path / "checkpoints" / "step-1")
    a = straight.accelerator.unwrap_model(straight.model).policy.state_dict()
    b = resumed.accelerator.unwrap_model(resumed.model).policy.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-10) for k in a)


def test_dapo_update_with_every_group_dropped_is_skipped(ppo):
    trainer = ppo(algo={"name": "dapo", "group_size": 4, "loss_aggregation": "dapo", "dynamic_sampling": True})
    r = trainer.make_rollout(trainer.batch_for(1))
    r.valid[:] = False  # as if every group had equal scores
    before = [p.detach().clone() for p in trainer.accelerator.unwrap_model(trainer.model).policy.parameters()]
    assert trainer.update(r, step=0)["ppo/skipped"] == 1.0
    after = trainer.accelerator.unwrap_model(trainer.model).policy.parameters()
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_dapo_token_level_loss_spans_the_optimizer_steps_micro_batches(ppo):
    """Under gradient accumulation (2 micro-batches of 8), the step's gradient is that of sum over all its tokens /
    their number (not a mean of micro-batch means)."""
    trainer = ppo(algo={"name": "dapo", "group_size": 4, "loss_aggregation": "dapo"})
    r = trainer.make_rollout(trainer.batch_for(1))
    weights, mask, _ = trainer.token_weights(r, 0)
    n = r.valid.shape[0]
    tokens = trainer.step_tokens(r, torch.arange(n), 2)
    halves = [trainer.micro_batch_losses(r, torch.arange(i, i + 8), weights, mask, batch_tokens=tokens)["policy"]
              for i in (0, 8)]
    whole = trainer.micro_batch_losses(r, torch.arange(n), weights, mask)["policy"]  # one batch: its own tokens
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-10)  # accelerate divides by 2


def test_g_sample_leaves_out_the_responses_dynamic_sampling_dropped():
    from po_experiments.analysis.ppo_sample import without_dropped_responses

    r = estimated("dapo", algo_of("dapo"), seed=6, uniform_group=True)
    k = settings(algo_of("dapo")).group_size
    kept = without_dropped_responses(r)
    assert kept.valid.shape[0] == r.valid.shape[0] - k and kept.valid.any(1).all()
    assert torch.equal(kept.advantages, r.advantages[k:]) and torch.equal(kept.scores, r.scores[k:])


def test_g_of_a_sample_dynamic_sampling_emptied_is_nan_not_a_crash(ppo, tmp_path, monkeypatch):
    """Every group of a checkpoint's G sample with equal scores (a DAPO run at high reward): no mini-batch carries
    gradient, so G is undefined there. The checkpoint's rows say NaN (and the step counts as analysed)."""
    import math

    from po_experiments.analysis import stage
    from po_experiments.analysis.gradients import MinibatchAlignment, ppo_alignment

    trainer = ppo(algo={"name": "dapo", "group_size": 4, "loss_aggregation": "dapo", "dynamic_sampling": True})
    from po_experiments.analysis.ppo_sample import without_dropped_responses

    r = trainer.make_rollout(trainer.batch_for(1))
    r.valid[:] = False  # dynamic sampling dropped every group
    empty = without_dropped_responses(r)
    model = trainer.accelerator.unwrap_model(trainer.model).policy
    mb = ppo_alignment(model, empty, {n: torch.zeros_like(p) for n, p in model.named_parameters()},
                       {"TOT": empty.advantages}, batch_size=4)
    assert isinstance(mb, MinibatchAlignment) and mb.G.shape[0] == 0
    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / "record.json").write_text('{"step": 1, "loss": 0.5}')
    monkeypatch.setattr(stage, "minibatch_alignment", lambda *a: mb)
    cfg = OmegaConf.create({"algo": {"family": "ppo"}, "analysis": {"dprime": "heldout"}})
    rows, batches = stage.analyse_checkpoint(cfg, 1, folder, None)
    assert batches == [] and len(rows) == 4 and all(math.isnan(row["G"]) for row in rows)
    assert rows[0]["n_batches"] == 0
