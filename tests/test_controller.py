"""controller=g_balance (closed-loop cDPO lambda, paper Sec. 5.2): the law's direction, G against a brute-force
G, controller=none unchanged, validation, the state over a resume, the aggregate's table, and run.py end to end."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import make_pairs, nudge
from po_experiments.config import _run_name, is_identity_key, validate
from po_experiments.controllers.g_balance import (GBalance, Law, alignment, balance_point, component_losses,
                                                  next_lambda, proxy_gradient, proxy_prompts)
from po_experiments.errors import ConfigError
from po_experiments.objectives.pairwise import PairTerms, schedule_lambda
from po_experiments.reporting.methods import describe

REPO = Path(__file__).resolve().parents[1]
LAW = Law(every=5, ramp=0.5, smoothing=1.0, lambda_max=1.0)


def _compose(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=list(overrides))
    cfg.paths.output_dir = "/nowhere"
    cfg.paths.cache_dir = "/nowhere"
    return cfg


# ------------------------------------------------------------------------------------------------ the law

def test_balance_point_is_the_most_negative_learning_that_does_not_lower_the_proxy():
    assert balance_point(2.0, 1.0, 1.0) == 1.0  # negative learning raises the proxy too: all of it
    assert balance_point(-1.0, 0.0, 0.9) == 0.9  # G_NEG >= 0: as far as lambda_max
    assert balance_point(3.0, -1.0, 1.0) == pytest.approx(0.75)  # (1 - l) 3 - l = 0
    assert balance_point(1.0, -1.0, 1.0) == pytest.approx(0.5)  # DPO's own balance (w+ = w-): net G_TOT = 0
    assert balance_point(-1.0, -2.0, 1.0) == 0.0  # both lower it: supervised learning only
    for g_pos, g_neg in ((3.0, -1.0), (0.2, -5.0), (7.0, -0.1)):  # at the point, the scheduled net effect is 0
        lam = balance_point(g_pos, g_neg, 1.0)
        assert (1 - lam) * g_pos + lam * g_neg == pytest.approx(0.0, abs=1e-12)
        assert (1 - (lam + 1e-3)) * g_pos + (lam + 1e-3) * g_neg < 0  # one step further would lower it


def test_law_follows_the_balance_point_at_a_bounded_pace():
    bound = LAW.step_bound(100)  # every 5 of 100 steps, 0 -> 1 in half the run: 0.1 per estimate
    assert bound == pytest.approx(0.1)
    up, _, target = next_lambda(0.2, None, g_pos=2.0, g_neg=1.0, law=LAW, total_steps=100)
    assert target == 1.0 and up == pytest.approx(0.3)  # toward the point, by the bound
    near, _, target = next_lambda(0.7, None, g_pos=3.0, g_neg=-1.0, law=LAW, total_steps=100)
    assert target == pytest.approx(0.75) and near == pytest.approx(0.75)  # within the bound: onto the point
    down = next_lambda(0.5, None, g_pos=1.0, g_neg=-3.0, law=LAW, total_steps=100)[0]
    assert down == pytest.approx(0.4)  # the point (0.25) lies below: back by the bound
    assert next_lambda(0.0, None, -1.0, -1.0, LAW, 100)[0] == 0.0  # never below 0
    capped = Law(**{**LAW.__dict__, "lambda_max": 0.95})
    assert next_lambda(0.9, None, 1.0, 1.0, capped, 100)[0] == 0.95  # never above lambda_max


def test_law_smooths_g_so_one_noisy_estimate_does_not_reverse_it():
    smooth = Law(**{**LAW.__dict__, "smoothing": 0.25})
    lam, ema = 0.5, None
    for _ in range(3):
        lam, ema, target = next_lambda(lam, ema, 1.0, 1.0, smooth, 100)
    assert target == 1.0 and lam == pytest.approx(0.8)
    lam2, ema2, target2 = next_lambda(lam, ema, 1.0, -3.0, smooth, 100)  # one estimate where NEG hurts
    assert ema2 == pytest.approx([1.0, 0.0]) and target2 == 1.0 and lam2 > lam  # the EMA of G_NEG is still >= 0
    assert Law(**{**LAW.__dict__, "every": 10, "ramp": 0.1}).step_bound(50) == 1.0  # never more than [0, 1]


# ------------------------------------------------------------------------------------------------ G

def _terms(model, ref, tokenizer, pairs, lam):
    from po_experiments.analysis.gradients import encode_pairs, sequence_logps

    enc = encode_pairs(tokenizer, pairs)
    side = {s: (enc[f"{s}_ids"], enc[f"{s}_mask"], enc[f"{s}_comp"]) for s in ("chosen", "rejected")}
    with torch.no_grad():
        rc, rr = (sequence_logps(ref, *side[s]) for s in ("chosen", "rejected"))
    return lambda: PairTerms(sequence_logps(model, *side["chosen"]), sequence_logps(model, *side["rejected"]), rc, rr,
                             step=3, lam=lam)


def _flat_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return out


def test_g_estimate_equals_brute_force_g_and_leaves_grad_untouched(task, tokenizer, tiny_model):
    from po_experiments.analysis.gradients import encode, sequence_logps

    model = tiny_model.double()
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    nudge(model)  # the policy away from the reference: omega differs between pairs
    pairs = make_pairs(task, 6)
    lam, beta = 0.3, 0.1
    algo = OmegaConf.create({"name": "cdpo", "family": "dpo", "beta": beta, "components": ["TOT"], "t1": 30, "t2": 80})
    questions = task.heldout_prompts(5)
    proxy = [encode(tokenizer, questions, [" " + c for c in list(pairs["chosen"])[:5]])]
    terms = _terms(model, ref, tokenizer, pairs, lam)

    G = alignment(model, component_losses(terms(), algo), proxy_gradient(model, proxy))
    assert all(p.grad is None for p in model.parameters())  # the trainer's .grad is never touched

    g = _flat_grad(model, -sequence_logps(model, *proxy[0]).mean())  # g' = E[-grad log pi(y')]
    t = terms()
    z = beta * ((1 - lam) * (t.chosen - t.ref_chosen) - lam * (t.rejected - t.ref_rejected))
    omega = (beta * torch.sigmoid(-z)).detach()  # Eq. 32's gradient weight, without the (1 - lambda, lambda) sides
    brute_pos = g @ _flat_grad(model, (-omega * t.chosen).mean())
    brute_neg = g @ _flat_grad(model, (omega * terms().rejected).mean())
    assert G["POS"] == pytest.approx(brute_pos.item(), rel=1e-9)
    assert G["NEG"] == pytest.approx(brute_neg.item(), rel=1e-9)
    assert G["POS"] != pytest.approx(G["NEG"])  # two different numbers, not one read twice


def test_unscheduled_weights_do_not_vanish_at_lambda_zero(task, tokenizer, tiny_model):
    """G_NEG is measurable while cDPO puts no weight on y- (lambda = 0): the controller's whole point."""
    model = tiny_model.double()
    algo = OmegaConf.create({"name": "cdpo", "family": "dpo", "beta": 0.1, "components": ["TOT"], "t1": 30, "t2": 80})
    losses = component_losses(_terms(model, copy.deepcopy(model), tokenizer, make_pairs(task, 4), 0.0)(), algo)
    grads = torch.autograd.grad(losses["NEG"], [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------ none = before

class _ScheduleStub:
    """A controller that sets the t1/t2 schedule's own lambda: training must not change by a bit."""

    def __init__(self, t1, t2):
        self.t1, self.t2, self.lam = t1, t2, 0.0

    def before_update(self, model, terms, algo, total_steps):
        self.lam = schedule_lambda(terms.step, self.t1, self.t2)


def _train(task, tokenizer, model, tmp_path, controller):
    from trl import DPOConfig

    from po_experiments.trainers.dpo import ComponentDPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, report_to=[],
                     max_length=32, dataset_num_proc=None, beta=0.1, precompute_ref_log_probs=False,
                     save_strategy="no", seed=0, bf16=False, learning_rate=1e-3, logging_steps=1)
    algo = OmegaConf.create({"name": "cdpo", "family": "dpo", "beta": 0.1, "components": ["TOT"], "t1": 1, "t2": 3})
    ablation = OmegaConf.create({"name": "none", "drop": [], "start_step": 0, "stop_step": None})
    trainer = ComponentDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                  train_dataset=make_pairs(task, 16), processing_class=tokenizer, algo=algo,
                                  ablation=ablation, controller=controller)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def test_controller_none_trains_exactly_as_the_schedule(task, tokenizer, tiny_model, tmp_path):
    """controller=None is the code path of before (the objective's t1/t2 schedule); a controller whose lambda is the
    schedule's gives bit-identical weights, so the controller hook itself changes nothing but lambda."""
    plain, trainer = _train(task, tokenizer, copy.deepcopy(tiny_model), tmp_path / "a", None)
    stub, _ = _train(task, tokenizer, copy.deepcopy(tiny_model), tmp_path / "b", _ScheduleStub(1, 3))
    assert all(torch.equal(plain[k], stub[k]) for k in plain)
    assert not all(torch.equal(plain[k], v) for k, v in tiny_model.state_dict().items())  # it did train
    assert [h["lambda"] for h in trainer.state.log_history if "lambda" in h][:4] == [0.0, 0.0, 0.5, 1.0]


# ------------------------------------------------------------------------------------------------ config

def test_validation_names_controller_and_algo():
    with pytest.raises(ConfigError, match=r"controller.name: controller=g_balance with algo=dpo: .*no lambda"):
        validate(_compose("controller=g_balance"))
    with pytest.raises(ConfigError, match=r"controller.name: controller=g_balance with algo=ppo"):
        validate(_compose("controller=g_balance", "algo=ppo"))
    for override, key in (("controller.every=0", "controller.every"), ("controller.ramp=0", "controller.ramp"),
                          ("controller.lambda_init=1.5", "controller.lambda_init"),
                          ("controller.smoothing=0", "controller.smoothing")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(_compose("controller=g_balance", "algo=cdpo", override))
    with pytest.raises(ConfigError, match=r"controller.name: .*ZeRO-3"):
        validate(_compose("controller=g_balance", "algo=cdpo", "deepspeed=zero3"))
    validate(_compose("controller=g_balance", "algo=cdpo"))
    validate(_compose("controller=g_balance", "algo=simpo", "algo.t1=30", "algo.t2=80"))  # the controlled schedule
    with pytest.raises(Exception, match="controller"):  # a typo fails at composition
        _compose("controller=g_balance", "controller.evry=3")


def test_controller_runs_are_labelled_and_named_apart():
    cdpo, ctl = _compose("algo=cdpo"), _compose("algo=cdpo", "controller=g_balance")
    assert describe(cdpo)["method"] == "cDPO (t1=30, t2=80)"
    assert describe(ctl)["method"] == "cDPO (g_balance)" and describe(ctl)["variant"] == "cdpo_g_balance"
    assert describe(_compose("algo=cdpo", "controller=g_balance", "controller.every=4"))["method"] == \
        "cDPO (g_balance every=4)"
    assert is_identity_key("controller") and is_identity_key("controller.every")
    assert _run_name(["algo=cdpo"]) != _run_name(["algo=cdpo", "controller=g_balance"])
    assert _run_name(["experiment/method=cdpo_case1"]) != _run_name(["experiment/method=cdpo_g_balance"])
    assert _compose("experiment=controller", "experiment/method=cdpo_g_balance").controller.name == "g_balance"
    assert _compose("experiment=controller", "experiment/method=cdpo_case1").controller.name == "none"


def test_proxy_questions_are_held_out_and_not_the_win_rate_prompts():
    cfg = _compose("algo=cdpo", "controller=g_balance", "data.n_heldout=40")
    from po_experiments.data.synthetic import DictionaryTask

    prompts = proxy_prompts(cfg, None, 8)
    heldout = DictionaryTask.from_config(cfg.data).heldout_prompts(48)
    assert prompts == heldout[40:]  # the held-out stream after the win-rate prompts (eval: the first n_heldout)


# ------------------------------------------------------------------------------------------------ resume

def test_state_is_saved_in_the_checkpoint_and_restored(tokenizer, tmp_path):
    cfg = _compose("algo=cdpo", "controller=g_balance")
    first = GBalance(cfg, tokenizer, tmp_path)
    first.state.lam, first.state.ema, first.state.last_step, first.state.estimates = 0.35, [1.0, 0.2], 30, 5
    first.state.rows, first.state.answers, first.state.seconds = [{"step": 30, "lambda": 0.35}], [" t1 t2"], 1.5
    folder = tmp_path / "checkpoint-40"
    folder.mkdir()
    first.save(folder)
    resumed = GBalance(cfg, tokenizer, tmp_path)
    assert resumed.lam == 0.0 and resumed.restore(folder)
    assert (resumed.lam, resumed.state.ema, resumed.state.last_step) == (0.35, [1.0, 0.2], 30)
    assert resumed.state.rows == first.state.rows and resumed.state.answers == [" t1 t2"]
    assert not resumed.due(30) and resumed.due(45)  # the step of the last estimate is not measured twice (every=15)
    assert not GBalance(cfg, tokenizer, tmp_path).restore(tmp_path)  # no state: starts again (warned)


# ------------------------------------------------------------------------------------------------ report

def test_controller_table_and_lambda_figure(tmp_path):
    from po_experiments.reporting.aggregate import Run
    from po_experiments.reporting.controller import controller_report

    runs, finals = [], []
    for seed in (0, 1):
        for method, variant, rate, wall, extra in (
                ("DPO", "baseline", 60 + seed, 100, {}),
                ("cDPO (t1=30, t2=80)", "cdpo", 62 + seed, 100, {"algo_params": {"t1": 30, "t2": 80}}),
                ("cDPO (g_balance)", "cdpo_g_balance", 64 + 2 * seed, 110,
                 {"controller": "g_balance", "controller_overhead": 0.05 + 0.01 * seed})):
            d = tmp_path / f"{variant}-{seed}"
            d.mkdir()
            if extra.get("controller"):
                pd.DataFrame({"step": [0, 10, 20], "lambda": [0.1, 0.2 + seed / 10, 0.3]}).to_csv(
                    d / "controller.csv", index=False)
            summary = {"method": method, "variant": variant, "family": "dpo", "model": "tiny", "seed": seed,
                       "wall_time_s": wall, "final_step": 108, **extra}
            runs.append(Run(d, summary, pd.DataFrame()))
            finals.append({"run": str(d), "judge": "gold", "model": "tiny", "method": method, "variant": variant,
                           "seed": seed, "win_rate": rate, "step": 108})
    written = controller_report(runs, pd.DataFrame(finals), tmp_path)
    table = pd.read_csv(written["controller.csv"]).set_index("method")
    ctl = table.loc["cDPO (g_balance)"]
    assert ctl["n_seeds"] == 2 and ctl["mean"] == pytest.approx(65) and ctl["std"] == pytest.approx(2 ** 0.5, abs=1e-4)
    assert ctl["controller_overhead"] == pytest.approx(0.055) and ctl["wall_vs_cdpo"] == pytest.approx(0.1)
    assert list(table.index) == ["DPO", "cDPO (t1=30, t2=80)", "cDPO (g_balance)"]
    assert "65.0 ± 1.4 (n=2)" in written["controller.md"].read_text()
    assert written["controller_lambda_tiny.png"].stat().st_size > 10_000
    assert controller_report(runs[:2], pd.DataFrame(finals[:2]), tmp_path / "none") == {}  # no controller run


# ------------------------------------------------------------------------------------------------ end to end

FAST = ["data.n_sft=2000", "model.sft.max_steps=40", "data.n_pref_prompts=300", "data.n_heldout=60",
        "model.dpo.batch_size=16", "model.dpo.epochs=1", "model.dpo.save_steps=4", "model.dpo.logging_steps=1",
        "runtime.threads=1", "analysis.enabled=false", "analysis.n_pairs=40", "logger=none",
        "algo=cdpo", "controller=g_balance", "controller.every=2", "controller.n_questions=8"]


def _run(run_dir: Path, cache: Path, *extra: str, check: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PO_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "run.py", *FAST, *extra, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_run_py_writes_controller_outputs_and_a_resumed_run_continues_the_same_law(tmp_path):
    cache = tmp_path / "cache"
    whole = tmp_path / "whole"
    _run(whole, cache)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["method"] == "cDPO (g_balance every=2 n_questions=8)" and summary["controller"] == "g_balance"
    assert 0 < summary["controller_overhead"] < 1
    rows = pd.read_csv(whole / "controller.csv")
    assert list(rows["step"]) == list(range(0, summary["final_step"], 2))
    assert rows["lambda"].between(0, 1).all() and rows["lambda_before"].iloc[0] == 0.0
    assert (rows["lambda_before"].iloc[1:].to_numpy() == rows["lambda"].iloc[:-1].to_numpy()).all()
    assert list(rows["refreshed"]) == [i % 2 == 0 for i in range(len(rows))]  # refresh=2
    assert (whole / "figures" / "controller.png").stat().st_size > 10_000
    history = json.loads((whole / "model" / "log_history.json").read_text())
    assert any("controller/G_NEG" in h for h in history) and any("controller/lambda" in h for h in history)
    state = json.loads((whole / "checkpoints" / "step-8" / "controller_state.json").read_text())
    # saved after update 8; the estimate at step 8 comes before update 9, so the state is the one set at step 6
    assert state["last_step"] == 6 and state["lam"] == pytest.approx(rows.set_index("step").at[6, "lambda"])

    killed = tmp_path / "killed"
    assert _run(killed, cache, "debug.kill_at_step=10", check=False).returncode != 0
    assert not (killed / "summary.json").exists()
    _run(killed, cache)  # resumes from step-8: lambda, the EMA and the proxy answers come back
    resumed = pd.read_csv(killed / "controller.csv")
    columns = ["step", "lambda_before", "lambda", "G_POS", "G_NEG", "lambda_target", "refreshed"]
    pd.testing.assert_frame_equal(resumed[columns], rows[columns], rtol=1e-6)
    assert json.loads((killed / "summary.json").read_text())["resumed_from"].endswith("step-8")


# ------------------------------------------------------------------------------------------------ PPO family

def test_ppo_controlled_weights_put_lambda_on_the_weightings_tokens():
    from po_experiments.objectives.policy_gradient import MID, TOP, controlled_weights, token_thirds

    adv = torch.tensor([[0.5, -0.2, 1.5, -2.0, 0.1, 0.0]], dtype=torch.float64)
    valid = torch.ones_like(adv, dtype=torch.bool)
    thirds = token_thirds(adv, valid)
    hppo, scalars = controlled_weights(adv, thirds, valid, "hppo", 0.25)
    assert torch.equal(hppo, torch.full_like(adv, 0.25).masked_fill(adv >= 0, 1.0)) and scalars == {"lambda": 0.25}
    for name, third in (("cppo_top", TOP), ("cppo_mid", MID)):
        w, _ = controlled_weights(adv, thirds, valid, name, 0.4)
        assert torch.equal(w, torch.full_like(adv, 0.4).masked_fill(thirds != third, 1.0)) and (w == 0.4).sum() == 2


def test_ppo_validation_and_labels():
    validate(_compose("controller=g_balance", "algo=hppo"))
    validate(_compose("controller=g_balance", "algo=cppo"))
    with pytest.raises(ConfigError, match=r"controller.name: controller=g_balance with algo=grpo: .*no lambda"):
        validate(_compose("controller=g_balance", "algo=grpo"))
    assert describe(_compose("controller=g_balance", "algo=hppo"))["method"] == "hPPO (g_balance)"
    assert describe(_compose("controller=g_balance", "algo=cppo"))["method"] == "cPPO-top (g_balance)"


def test_ppo_component_losses_are_the_surrogate_gradient_at_the_rollout_policy(ppo):
    """G_c of the controller (unscheduled: weight 1 on the component's tokens) equals that of the trainer's own
    clipped-surrogate loss with the component's mask, at the rollout's policy (ratio 1)."""
    from po_experiments.objectives.policy_gradient import TOKEN_COMPONENTS, thirds_of

    trainer = ppo(algo={"name": "cppo", "weighting": "cppo_top", "lam": 0.3})
    r = trainer.make_rollout(trainer.batch_for(1))
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    params = [p for p in policy.parameters() if p.requires_grad]
    torch.manual_seed(3)
    direction = [torch.randn_like(p) for p in params]
    idx = torch.arange(8)
    G = alignment(policy, trainer.component_losses(r, idx, ("REST", "TOP")), direction)
    thirds = thirds_of(r.advantages, r.valid, trainer.algo)
    top = TOKEN_COMPONENTS["TOP"](r.advantages, thirds, r.valid)
    for name, mask in (("TOP", top), ("REST", r.valid & ~top)):
        loss = trainer.micro_batch_losses(r, idx, torch.ones_like(r.advantages), mask.to(r.advantages.dtype),
                                          kl_on=False)["policy"]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        brute = sum((d * g).sum() for d, g in zip(direction, grads) if g is not None).item()
        assert G[name] == pytest.approx(brute, rel=1e-8), name
    assert all(p.grad is None for p in params)


def test_ppo_trainer_with_the_controller(ppo, tokenizer, tmp_path):
    cfg = _compose("algo=hppo", "controller=g_balance", "controller.every=1", "controller.n_questions=4")
    controller = GBalance(cfg, tokenizer, tmp_path)
    trainer = ppo(algo={"name": "hppo", "weighting": "hppo", "t3": 2, "tau": 0.08})
    trainer.controller = controller
    trainer.train()
    rows = pd.read_csv(tmp_path / "controller.csv")
    assert list(rows["step"]) == list(range(trainer.state.max_steps)) and {"G_POS", "G_NEG"} <= set(rows.columns)
    assert rows["lambda"].between(0, 1).all() and rows["lambda_before"].iloc[0] == 0.0
    r = trainer.make_rollout(trainer.batch_for(1))
    weights, _, scalars = trainer.token_weights(r, 0)
    assert scalars["lambda"] == controller.lam
    assert torch.equal(weights, torch.full_like(weights, controller.lam).masked_fill(~(r.advantages < 0), 1.0))
    assert any("controller/G_NEG" in h for h in trainer.state.log_history)


# ------------------------------------------------------------------------------------------------ G of a controller run

def test_g_of_a_controller_run_uses_the_lambda_in_force_at_each_checkpoint(tmp_path):
    """The analysis' coefficients are the trained update's: the controller's lambda (controller.csv: the last
    estimate at a step <= the checkpoint's), not the t1/t2 schedule the config still records."""
    from po_experiments.analysis.gradients import dpo_coefficients
    from po_experiments.controllers.g_balance import CSV, lambda_in_force

    pd.DataFrame({"step": [0, 15, 30], "lambda": [0.2, 0.5, 0.9]}).to_csv(tmp_path / CSV, index=False)
    assert lambda_in_force(tmp_path, 0, 0.0) == 0.2 and lambda_in_force(tmp_path, 14, 0.0) == 0.2
    assert lambda_in_force(tmp_path, 15, 0.0) == 0.5 and lambda_in_force(tmp_path, 100, 0.0) == 0.9
    assert lambda_in_force(tmp_path, -1, 0.3) == 0.3  # before the first estimate: lambda_init
    with pytest.raises(FileNotFoundError, match="controller.csv"):
        lambda_in_force(tmp_path / "nowhere", 5, 0.0)

    algo = _compose("algo=cdpo", "algo.t1=30", "algo.t2=80").algo
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_c, ref_r = (torch.randn(12, generator=g, dtype=torch.float64) for _ in range(4))
    at = lambda step, lam=None: dpo_coefficients(chosen, rejected, ref_c, ref_r, algo, step, lam=lam)  # noqa: E731
    scheduled, controlled = at(55), at(10, lam=0.5)  # the schedule's lambda at step 55 is 0.5
    for c in scheduled:
        torch.testing.assert_close(controlled[c], scheduled[c])
    assert not torch.allclose(at(10)["NEG"], controlled["NEG"])  # at step 10 the schedule's lambda is 0
