"""The PPO family's formulas (Eq. 11-16, 33-35), GAE, and checkpoints that carry their rollout."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from po_experiments.objectives.pairwise import MID, TOP
from po_experiments.trainers.ppo import Rollout
from po_experiments.objectives.policy_gradient import (
    TOKEN_COMPONENTS, WEIGHTINGS, gae, hppo_lambda, token_mask, token_thirds,
)

from conftest import PPO_ALGO as ALGO, nudge


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
    nudge(trainer.accelerator.unwrap_model(trainer.model).policy)


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
    from po_experiments.tasks import prompt_dataset

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


# ------------------------------------------------------------------------------------------ precision and scale


def small_ppo(task, tokenizer, model, tmp_path, *, dtype=torch.float32, bf16=False, pure=False, lr=1e-4,
              updates=1, temperature=1.0, checkpointing=False, generation_batch_size=None, name="run"):
    """A ComponentPPOTrainer on a copy of `model` in `dtype`, value model initialised like the conftest fixture's."""
    from transformers import GPTNeoXForSequenceClassification
    from trl.experimental.ppo import PPOConfig

    from datasets import Dataset

    from po_experiments.rewards import GoldReward
    from po_experiments.trainers.ppo import ComponentPPOTrainer

    policy = copy.deepcopy(model).to(dtype)
    torch.manual_seed(0)
    value_config = copy.deepcopy(policy.config)
    value_config.num_labels = 1
    value = GPTNeoXForSequenceClassification(value_config).to(dtype)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in task.preference_prompts(16, 0)]
    args = PPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                     total_episodes=16 * updates, response_length=6, temperature=temperature, stop_token="eos",
                     learning_rate=lr, lr_scheduler_type="constant", num_ppo_epochs=2, num_mini_batches=1,
                     num_sample_generations=0, report_to=[], bf16=bf16, use_cpu=True, seed=0, save_strategy="no",
                     local_rollout_forward_batch_size=4, kl_coef=0.05, activation_checkpointing=checkpointing)
    data = Dataset.from_dict({"input_ids": prompts})
    ablation = OmegaConf.create({"name": "none", "drop": [], "start_step": 0, "stop_step": None})
    return ComponentPPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=copy.deepcopy(policy),
                               value_model=value, train_dataset=data, eval_dataset=data.select(range(4)),
                               reward=GoldReward(task), algo=OmegaConf.create(ALGO), ablation=ablation,
                               generation_batch_size=generation_batch_size, pure_low_precision=pure)


def trained_models(trainer):
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    return {"policy": wrapper.policy, "value": wrapper.value_model}


def movement(trainer, steps: int) -> dict[str, float]:
    """||theta_T - theta_0|| of policy and value after `steps` updates (fp64 arithmetic on the stored values)."""
    start = {k: [p.detach().double().clone() for p in m.parameters()] for k, m in trained_models(trainer).items()}
    trainer.args.num_total_batches = steps
    trainer.train()
    return {k: torch.sqrt(sum(((p.detach().double() - p0) ** 2).sum() for p, p0 in zip(m.parameters(), start[k])))
            .item() for k, m in trained_models(trainer).items()}


def test_bf16_run_keeps_fp32_master_weights_and_moves_like_fp32(task, tokenizer, tiny_model, tmp_path):
    """model.dtype=bfloat16 at the paper's PPO lr 2e-6: fp32 master weights under bf16 autocast move the parameters
    as far as a float32 run does; pure bf16 weights (the control) round most of each AdamW step away."""
    base = copy.deepcopy(tiny_model).to(torch.bfloat16).float()  # one start for all three: bf16-representable
    runs = {"fp32": dict(dtype=torch.float32), "mixed": dict(dtype=torch.bfloat16, bf16=True),
            "pure": dict(dtype=torch.bfloat16, bf16=True, pure=True)}
    moved = {}
    for name, kw in runs.items():
        trainer = small_ppo(task, tokenizer, base, tmp_path, lr=2e-6, name=name, **kw)
        dtypes = {p.dtype for m in trained_models(trainer).values() for p in m.parameters()}
        assert dtypes == ({torch.bfloat16} if name == "pure" else {torch.float32}), name
        assert trainer.accelerator.mixed_precision == ("bf16" if name == "mixed" else "no")
        moved[name] = movement(trainer, steps=3)
    for part in ("policy", "value"):
        assert moved["fp32"][part] > 0
        assert 0.9 <= moved["mixed"][part] / moved["fp32"][part] <= 1.1, (part, moved)
        assert moved["pure"][part] / moved["fp32"][part] < 0.5, (part, moved)


def test_behaviour_logprobs_from_a_forward_equal_generates_logits(ppo):
    """The rollout's behaviour log-probs (forward pass, micro-batched) are generate's own raw logits / T at the
    sampled tokens, at a temperature != 1 (the same division the update's forward applies)."""
    from trl.trainer.utils import selective_log_softmax

    trainer = ppo()
    trainer.args.temperature = 0.7
    batch = trainer.batch_for(1)
    torch.manual_seed(123)
    r = trainer.rollout(batch)

    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    queries, mask = batch["input_ids"], batch["attention_mask"]
    config = GenerationConfig(max_new_tokens=trainer.args.response_length, do_sample=True, top_k=0, top_p=1.0,
                              temperature=0.7, pad_token_id=trainer.processing_class.pad_token_id,
                              eos_token_id=trainer.stop_token_id, return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(123)
    out = policy.generate(input_ids=queries, attention_mask=mask, generation_config=config)
    responses = out.sequences[:, queries.shape[1]:]
    assert torch.equal(responses.masked_fill(~r.valid, 0), r.responses.masked_fill(~r.valid, 0))  # same samples
    logits = torch.stack(out.logits, 1).double()  # generate hands out float32 copies: agreement to fp32 rounding
    reference = selective_log_softmax(logits / 0.7, responses)
    assert torch.allclose(r.logprobs[r.valid], reference[r.valid], rtol=0, atol=1e-5)
    assert (r.logprobs - selective_log_softmax(logits, responses))[r.valid].abs().max() > 1e-2  # T mattered
    # and the update's forward on the unchanged policy reproduces them: every ratio is 1 before the first step
    idx = torch.arange(len(r.valid))
    weights, tok_mask, _ = trainer.token_weights(trainer.advantages(trainer.score(r)), 0)
    assert trainer.micro_batch_losses(r, idx, weights, tok_mask)["ratio"].item() == pytest.approx(1.0, abs=1e-12)


def test_generation_batch_is_independent_of_the_micro_batch(task, tokenizer, tiny_model, tmp_path):
    """generate() sees chunks of generation_batch_size prompts; forward passes and the update use the
    per-device micro-batch; the rollout's estimates do not depend on the forward micro-batch."""
    trainer = small_ppo(task, tokenizer, tiny_model, tmp_path, dtype=torch.float64, generation_batch_size=16)
    policy = trained_models(trainer)["policy"]
    calls, real_generate = [], policy.generate
    policy.generate = lambda **kw: calls.append(len(kw["input_ids"])) or real_generate(**kw)
    r = trainer.rollout(trainer.batch_for(1))
    assert calls == [16] and trainer.args.per_device_train_batch_size == 4
    trainer.generation_batch_size = 5
    calls.clear()
    trainer.rollout(trainer.batch_for(1))
    assert calls == [5, 5, 5, 1]
    ctx = r.context_length
    trainer.args.local_rollout_forward_batch_size = 16  # one forward over the whole batch: the same estimates
    whole = trainer.forward_estimates(r.query_responses, r.attention_mask, r.query_responses.shape[1] - ctx)
    for name, got in zip(("logprobs", "ref_logprobs", "values"), whole):
        assert torch.allclose(got.masked_fill(~r.valid, 0.0), getattr(r, name), rtol=0, atol=1e-10), name


def test_activation_checkpointing_is_on_when_asked_and_changes_no_gradient(task, tokenizer, tiny_model, tmp_path):
    plain = small_ppo(task, tokenizer, tiny_model, tmp_path, dtype=torch.float64, name="plain")
    ckpt = small_ppo(task, tokenizer, tiny_model, tmp_path, dtype=torch.float64, checkpointing=True, name="ckpt")
    assert all(m.is_gradient_checkpointing for m in trained_models(ckpt).values())
    assert not any(m.is_gradient_checkpointing for m in trained_models(plain).values())
    torch.manual_seed(7)
    r = plain.make_rollout(plain.batch_for(1))
    torch.manual_seed(7)
    r2 = ckpt.make_rollout(ckpt.batch_for(1))  # generation in eval mode: the KV cache is not refused
    assert torch.equal(r.query_responses, r2.query_responses)
    grads = []
    for trainer in (plain, ckpt):
        trainer.model.train()
        weights, mask, _ = trainer.token_weights(r, 0)
        loss = trainer.micro_batch_losses(r, torch.arange(8), weights, mask)["loss"]
        params = [p for m in trained_models(trainer).values() for p in m.parameters()]
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    assert grads[0].norm() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_ppo_stage_arguments_precision_checkpointing_and_placement():
    """The stage's choices: autocast from model.dtype (weights fp32 unless pure_low_precision), checkpointing on for
    real models only, models loaded straight to this rank's device."""
    from hydra import compose, initialize_config_dir

    from po_experiments.config import validate
    from po_experiments.errors import ConfigError
    from po_experiments.models import placement, training_dtype
    from po_experiments.stages.ppo_policy import ppo_config

    conf = str(Path(__file__).resolve().parents[1] / "conf")

    def make(*overrides):
        with initialize_config_dir(version_base="1.3", config_dir=conf):
            return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.cache_dir=/tmp/y", "algo=ppo",
                                                *overrides])

    tiny = make("model.dtype=bfloat16")
    args = ppo_config(tiny, Path("/tmp/x/ckpt"), [])
    assert args.bf16 and not args.activation_checkpointing and training_dtype(tiny.model) == torch.float32
    assert placement() == ({"device_map": {"": "cuda:0"}} if torch.cuda.is_available() else {})
    assert training_dtype(make("model.dtype=bfloat16", "model.pure_low_precision=true").model) == torch.bfloat16
    pythia = make("model=pythia", "model.ppo.batch_size=8")
    assert ppo_config(pythia, Path("/tmp/x/ckpt"), []).activation_checkpointing
    assert not ppo_config(make("model=pythia", "model.ppo.batch_size=8", "model.activation_checkpointing=false"),
                          Path("/tmp/x/ckpt"), []).activation_checkpointing
    with pytest.raises(ConfigError, match=r"model\.ppo\.generation_batch_size"):
        validate(make("model.ppo.generation_batch_size=0"))
    zero3 = make("deepspeed=zero3")
    validate(zero3)  # PPO under ZeRO-3: partitioned from the load on (no device_map), gathered into checkpoints
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save"):
        validate(make("deepspeed=zero3",
                      "deepspeed.config.zero_optimization.stage3_gather_16bit_weights_on_model_save=false"))


def test_linear_swapped_by_zero3_init_is_restored_after_ppo(monkeypatch):
    """ZeRO-3's zero.Init replaces torch.nn.functional.linear for good; the PPO stage puts the original back (the
    G analysis after it runs forward-mode AD, which DeepSpeed's replacement has no rule for)."""
    import sys
    import types

    from po_experiments.distributed import restore_torch_linear

    original = torch.nn.functional.linear
    patcher = types.SimpleNamespace(linear_bk=original)
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.partition_parameters",
                        types.SimpleNamespace(InsertPostInitMethodToModuleSubClasses=patcher))
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: None)
    restore_torch_linear()
    assert torch.nn.functional.linear is original
    x = torch.randn(2, 3, dtype=torch.float64)
    lin = torch.nn.Linear(3, 1, dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda v: lin(v), (x,), (torch.ones_like(x),))
    assert torch.allclose(tangent, (torch.ones_like(x) @ lin.weight.T))


# ------------------------------------------------------------------------------------------ Fig. 3 and App. A's record


def test_fig3_means_are_signed_whitened_advantages_per_third(ppo):
    """`adv/<third>`: the mean signed whitened A over the tokens of that |A| third (ranked over the rollout);
    `adv_unwhitened/<third>`: the GAE before whitening over the same tokens. Recomputed here from plain lists."""
    trainer = ppo()
    r = trainer.make_rollout(trainer.batch_for(1))
    logged = trainer.rollout_metrics(r)
    tokens = [(a, raw) for row_a, row_raw, row_v in zip(r.advantages.tolist(), r.raw_advantages.tolist(),
                                                        r.valid.tolist())
              for a, raw, v in zip(row_a, row_raw, row_v) if v]
    ranked = sorted(range(len(tokens)), key=lambda i: abs(tokens[i][0]))  # by |A|, stable
    third = {i: (3 * rank) // len(tokens) for rank, i in enumerate(ranked)}
    for name, k in (("BOT", 0), ("MID", 1), ("TOP", 2)):
        members = [tokens[i] for i in third if third[i] == k]
        assert logged[f"adv/{name}"] == pytest.approx(sum(a for a, _ in members) / len(members), rel=1e-9)
        assert logged[f"adv_unwhitened/{name}"] == pytest.approx(sum(w for _, w in members) / len(members), rel=1e-9)
    assert any(abs(logged[f"adv/{n}"] - logged[f"adv_unwhitened/{n}"]) > 1e-3 for n in ("TOP", "MID", "BOT"))


def test_loss_check_records_the_objective_before_and_after_each_checkpoints_update(ppo, tmp_path):
    trainer = ppo(save_steps=1)
    trainer.args.num_total_batches = 3
    trainer.train()
    root = tmp_path / "checkpoints"
    assert not (root / "step-3" / "loss_check.json").exists()  # the final step: no update follows it
    for step in (1, 2):
        check = json.loads((root / f"step-{step}" / "loss_check.json").read_text())
        assert set(check) == {"before", "after", "measured_on"}
        fresh = ppo()
        _, rollout = fresh.restore(root / f"step-{step}")  # theta_N and the rollout of update N+1
        assert check["before"] == pytest.approx(fresh.policy_objective(rollout, step), rel=1e-9)
        # at theta_N the ratio is 1: the surrogate is -A (weights 1), its mean per micro-batch of 8, as the update
        # normalises, averaged over the micro-batches (over the whole batch it would be 0: A is whitened)
        per_batch = [-(rollout.advantages[i:i + 8][rollout.valid[i:i + 8]]).mean().item() for i in (0, 8)]
        assert check["before"] == pytest.approx(sum(per_batch) / 2, rel=1e-6, abs=1e-9)
        if step == 1:  # the fixture's linear schedule reaches lr 0 at the last update
            assert check["after"] < check["before"] - 1e-6  # the update lowered its own objective
        fresh.update(rollout, step)  # the same update (same minibatch order: the checkpoint's sampler state)
        assert check["after"] == pytest.approx(fresh.policy_objective(rollout, step), rel=1e-9)


def test_loss_check_is_written_by_a_run_resumed_from_the_checkpoint(ppo, tmp_path):
    first = ppo(save_steps=1)
    first.args.num_total_batches = 1  # killed after update 1: step-1 exists, update 2 never ran
    first.train()
    assert not (tmp_path / "checkpoints" / "step-1" / "loss_check.json").exists()
    resumed = ppo(save_steps=1)
    resumed.args.num_total_batches = 2
    resumed.train(resume_from=tmp_path / "checkpoints" / "step-1")
    assert (tmp_path / "checkpoints" / "step-1" / "loss_check.json").exists()


# ------------------------------------------------------------------------------------------ PPO G's sample (App. C.2)


def sample_config(tmp_path, *overrides):
    from test_config import make

    return make(["algo=ppo", "reward=gold", "analysis.n_pairs=10", "model.ppo.batch_size=32",
                 f"paths.output_dir={tmp_path}", *overrides])


@pytest.fixture
def checkpoints(ppo, tiny_model, tokenizer, tmp_path):
    """step-1 and step-2 of a PPO run on the tiny model (policy, value model, rollout) and its SFT folder."""
    tiny_model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    trainer = ppo(save_steps=1)
    trainer.args.num_total_batches = 2
    trainer.train()
    return tmp_path / "checkpoints", tmp_path / "sft"


def brute_force_advantages(sample, kl_coef, lam):
    """KL-penalised rewards, GAE (gamma 1) by its definition, whitened over every valid token of the sample."""
    adv_rows = []
    for lp, ref, val, valid, score in zip(sample.logprobs.tolist(), sample.ref_logprobs.tolist(),
                                          sample.values.tolist(), sample.valid.tolist(), sample.scores.tolist()):
        n = sum(valid)
        rewards = [-kl_coef * (lp[t] - ref[t]) for t in range(n)]
        rewards[-1] += score
        values = val[:n] + [0.0]
        deltas = [rewards[t] + values[t + 1] - values[t] for t in range(n)]
        adv_rows.append([sum(lam ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)])
    flat = torch.tensor([a for row in adv_rows for a in row], dtype=torch.float64)
    mean, std = flat.mean(), flat.var(unbiased=True).add(1e-8).sqrt()
    return [[(a - mean.item()) / std.item() for a in row] for row in adv_rows]


def test_ppo_analysis_sample_is_n_pairs_responses_whitened_as_one(checkpoints, tmp_path, monkeypatch):
    from po_experiments.analysis import ppo_sample
    from po_experiments.analysis.gradients import ppo_token_coefficients

    root, sft = checkpoints
    cfg = sample_config(tmp_path)
    sample = ppo_sample.analysis_sample(cfg, 1, root / "step-1", sft)
    assert sample.valid.shape[0] == cfg.analysis.n_pairs == 10
    expected = brute_force_advantages(sample, cfg.algo.kl_coef, cfg.algo.gae_lambda)
    got = [row[:len(e)] for row, e in zip(sample.advantages.tolist(), expected)]
    assert got == [pytest.approx(e, rel=1e-5, abs=1e-6) for e in expected]
    # thirds of |A| over the whole sample: a third of the sample's valid tokens each
    coef = ppo_token_coefficients(sample, cfg.algo, 1, WEIGHTINGS["ppo"])
    n_valid = int(sample.valid.sum())
    for comp in ("TOP", "MID", "BOT"):
        assert abs(int((coef[comp] != 0).sum()) - n_valid / 3) <= 1
    top_mask = coef["TOP"] != 0
    flat = [abs(a) for row, e in zip(sample.advantages.tolist(), expected) for a in row[:len(e)]]
    cut = sorted(flat)[n_valid - int(top_mask.sum())]
    assert sample.advantages.abs()[top_mask].min().item() == pytest.approx(cut)
    # cached: a second call reads the file and generates nothing
    monkeypatch.setattr(ppo_sample, "generate_share", lambda *a, **k: pytest.fail("generated again"))
    again = ppo_sample.analysis_sample(cfg, 1, root / "step-1", sft)
    assert torch.equal(again.query_responses, sample.query_responses)
    rollout = ppo_sample.analysis_sample(sample_config(tmp_path, "analysis.ppo_sample=rollout"), 1, root / "step-1",
                                         sft)
    assert rollout.valid.shape[0] == 16  # the saved rollout batch


def test_ppo_analysis_sample_is_generated_by_the_checkpoints_policy(checkpoints, tmp_path):
    """The responses equal a direct `generate` of theta_t with the sampling seed and the run's sampling settings,
    and their log-probs its forward at the sampling temperature; another checkpoint gives another sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_experiments.analysis import ppo_sample

    root, sft = checkpoints
    cfg = sample_config(tmp_path, "model.ppo.temperature=0.7")
    sample = ppo_sample.analysis_sample(cfg, 1, root / "step-1", sft)
    tok = AutoTokenizer.from_pretrained(sft)
    prompts, _ = ppo_sample.sample_prompts(cfg, tok)
    queries, mask = ppo_sample.left_padded(prompts, tok.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(root / "step-1", dtype=torch.float32).eval()
    torch.manual_seed(ppo_sample.sampling_seed(cfg, 0))
    p = cfg.model.ppo
    out = policy.generate(input_ids=queries, attention_mask=mask, do_sample=True, top_k=0, top_p=p.top_p,
                          temperature=p.temperature, max_new_tokens=p.max_new_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)[:, queries.shape[1]:]
    for row, valid, direct in zip(sample.responses, sample.valid, out):
        n = int(valid.sum())
        assert row[:n].tolist() == direct[:n].tolist()
        assert n == len(direct) or direct[n - 1] == tok.eos_token_id
    with torch.no_grad():
        logits = policy(input_ids=sample.query_responses, attention_mask=sample.attention_mask,
                        position_ids=(sample.attention_mask.cumsum(1) - 1).clamp(min=0)).logits
    ctx = sample.context_length
    direct_lp = torch.log_softmax(logits[:, ctx - 1:-1].double() / 0.7, -1).gather(-1, sample.responses[..., None])[..., 0]
    assert torch.allclose(sample.logprobs[sample.valid].double(), direct_lp[sample.valid], atol=1e-4)
    later = ppo_sample.analysis_sample(cfg, 2, root / "step-2", sft)
    assert not torch.allclose(later.logprobs, sample.logprobs[:, :later.logprobs.shape[1]]) or \
        not torch.equal(later.query_responses, sample.query_responses)


def test_ppo_g_runs_on_the_fresh_sample(checkpoints, tmp_path, task, tokenizer):
    from po_experiments.analysis.gradients import encode
    from po_experiments.analysis.stage import PPOSample, minibatch_alignment

    root, sft = checkpoints
    cfg = sample_config(tmp_path, "analysis.n_pairs=13")
    prompts = task.heldout_prompts(4)
    answers = [task.completion_text([int(w[1:]) for w in p.split()[1:-1]]) for p in prompts]
    mb = minibatch_alignment(cfg, 1, root / "step-1", [encode(tokenizer, prompts, answers)], PPOSample(cfg, sft))
    assert mb.G.shape == (3, 6, 4) and torch.isfinite(mb.G).all()  # 13 responses in mini-batches of 6


@pytest.mark.parametrize("value, ok", [("fresh", True), ("rollout", True), ("saved", False)])
def test_ppo_sample_key_validates(value, ok):
    from test_config import make

    from po_experiments.config import validate
    from po_experiments.errors import ConfigError

    cfg = make(["algo=ppo", f"analysis.ppo_sample={value}"])
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=r"analysis\.ppo_sample"):
            validate(cfg)


TWO_RANKS = '''
import sys
from pathlib import Path
import torch, torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_ppo import sample_config
from po_experiments.analysis.ppo_sample import share_ppo_samples
dist.init_process_group("gloo")
root = Path(sys.argv[1])
share_ppo_samples(sample_config(root), {1: root / "checkpoints" / "step-1"}, root / "sft")
dist.destroy_process_group()
'''


@pytest.mark.slow  # two processes
def test_two_ranks_generate_their_shares_and_rank_0_whitens_them_together(checkpoints, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from po_experiments.analysis import ppo_sample

    root, sft = checkpoints
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests.parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29743", str(script), str(tmp_path), str(tests)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("WORLD_SIZE", "2")  # the cache is keyed by the job's size
    cfg = sample_config(tmp_path)
    cached = Rollout.load(ppo_sample.cache_path(cfg, root / "step-1"))
    assert cached.valid.shape[0] == 10
    shares = [ppo_sample.generate_share(cfg, root / "step-1", sft, rank, 2) for rank in (0, 1)]
    assert [s.valid.shape[0] for s, _ in shares] == [5, 5]
    alone = ppo_sample.whole_sample(cfg, [s for s, _ in shares], shares[0][1])
    assert torch.equal(cached.query_responses, alone.query_responses)
    assert torch.allclose(cached.advantages, alone.advantages, atol=1e-6)
    # whitened over both shares: rank 0's share alone would have mean 0 over its own tokens instead
    assert abs(cached.advantages[:5][cached.valid[:5]].mean().item()) > 1e-3
