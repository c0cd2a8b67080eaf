"""App. A's loss check: L on the G sample before and after the update that follows each checkpoint, written into
`checkpoints/step-N/loss_check.json`, checked against an independent recomputation (the analysis code's
log-probs, not TRL's), and written after a resume too."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import DPOConfig

from conftest import make_pairs
from po_experiments.analysis.gradients import encode_pairs, sequence_logps
from po_experiments.analysis.sample import pair_sample_indices, select_pair_sample
from po_experiments.checkpoints import StepCheckpoints
from po_experiments.trainers.dpo import ComponentDPOTrainer
from po_experiments.trainers.loss_check import LOSS_CHECK, LossCheck, rank_share
from po_experiments.objectives.pairwise import schedule_lambda as cdpo_lambda

CDPO = {"name": "cdpo", "beta": 0.5, "components": ["TOT"], "t1": 0, "t2": 6}  # lambda moves every step
RUN = OmegaConf.create({"seed": 3, "analysis": {"n_pairs": 12}})


class Crash(TrainerCallback):
    """Raise at the end of optimizer step `step`, before the loss check runs (a node failure in a test)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("crash")


def train(model, tokenizer, pairs, root, *, max_steps=5, resume=None, crash_at=None):
    args = DPOConfig(output_dir=str(root), per_device_train_batch_size=4, report_to=[], max_length=64,
                     dataset_num_proc=None, beta=CDPO["beta"], precompute_ref_log_probs=True, save_strategy="steps",
                     save_steps=1, max_steps=max_steps, learning_rate=5e-3, seed=0, bf16=False, logging_steps=1)
    check = LossCheck(root, batch_size=5, measured_on="test sample")
    callbacks = [StepCheckpoints(root), *([Crash(crash_at)] if crash_at else []), check]
    trainer = ComponentDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                  eval_dataset=select_pair_sample(RUN, pairs), callbacks=callbacks,
                                  algo=OmegaConf.create(CDPO),
                                  ablation=OmegaConf.create({"name": "none", "drop": [], "start_step": 0,
                                                             "stop_step": None}))
    check.bind(trainer)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return check


def direct_loss(policy, reference, encoded, step: int) -> float:
    """The cDPO loss (Eq. 32) at lambda(step), from the analysis code's sequence log-probs."""
    with torch.no_grad():
        lp = {s: sequence_logps(m, *(encoded[f"{s}_{k}"] for k in ("ids", "mask", "comp")))
              for m in (policy,) for s in ("chosen", "rejected")}
        ref = {s: sequence_logps(reference, *(encoded[f"{s}_{k}"] for k in ("ids", "mask", "comp")))
               for s in ("chosen", "rejected")}
    lam = cdpo_lambda(step, CDPO["t1"], CDPO["t2"])
    z = CDPO["beta"] * ((1 - lam) * (lp["chosen"] - ref["chosen"]) - lam * (lp["rejected"] - ref["rejected"]))
    return (-F.logsigmoid(z)).mean().item()


@pytest.fixture
def pairs(task):
    return make_pairs(task, 48)


def test_before_and_after_are_the_loss_at_the_checkpoint_and_after_the_next_update(tiny_model, tokenizer, pairs,
                                                                                   tmp_path):
    start = copy.deepcopy(tiny_model).eval()
    root = tmp_path / "checkpoints"
    train(tiny_model, tokenizer, pairs, root)
    encoded = encode_pairs(tokenizer, select_pair_sample(RUN, pairs))
    load = lambda n: AutoModelForCausalLM.from_pretrained(root / f"step-{n}").eval()  # noqa: E731
    for n in range(1, 5):
        record = json.loads((root / f"step-{n}" / LOSS_CHECK).read_text())
        assert record["measured_on"] == "test sample" and record["step"] == n
        # lambda(n) at both ends: the objective of update n+1, not lambda(n+1)
        assert record["before"] == pytest.approx(direct_loss(load(n), start, encoded, n), rel=1e-5)
        assert record["after"] == pytest.approx(direct_loss(load(n + 1), start, encoded, n), rel=1e-5)
        assert record["after"] != pytest.approx(direct_loss(load(n + 1), start, encoded, n + 1), rel=1e-5)
    assert not (root / "step-5" / LOSS_CHECK).exists()  # the final checkpoint has no next update


def test_a_run_resumed_from_a_checkpoint_still_writes_its_file(tiny_model, tokenizer, pairs, tmp_path):
    whole = tmp_path / "whole"
    train(copy.deepcopy(tiny_model), tokenizer, pairs, whole, max_steps=4)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):  # step-2 is saved; update 3 ends before its check is written
        train(copy.deepcopy(tiny_model), tokenizer, pairs, broken, max_steps=4, crash_at=3)
    assert (broken / "step-1" / LOSS_CHECK).exists() and not (broken / "step-2" / LOSS_CHECK).exists()
    check = train(copy.deepcopy(tiny_model), tokenizer, pairs, broken, max_steps=4, resume=broken / "step-2")
    for n in (2, 3):
        resumed = json.loads((broken / f"step-{n}" / LOSS_CHECK).read_text())
        uninterrupted = json.loads((whole / f"step-{n}" / LOSS_CHECK).read_text())
        assert resumed["before"] == pytest.approx(uninterrupted["before"], rel=1e-6)
        assert resumed["after"] == pytest.approx(uninterrupted["after"], rel=1e-6)
    assert check.seconds > 0


def test_rank_shares_cover_the_sample_once_with_equal_forward_counts():
    for n, world in ((12, 1), (12, 5), (3, 4), (500, 8)):
        shares = [rank_share(n, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        assert sorted(i for s in shares for i in s if i is not None) == list(range(n))


def test_the_loss_check_and_G_use_one_sample(pairs):
    """analysis/stage.py's pair_sample selects through the same function (seeded by the run's seed)."""
    import inspect

    from po_experiments.analysis import stage

    assert "select_pair_sample" in inspect.getsource(stage.pair_sample)
    assert pair_sample_indices(RUN, 48) == pair_sample_indices(RUN, 48)
    assert pair_sample_indices(RUN, 48) != pair_sample_indices(OmegaConf.merge(RUN, {"seed": 4}), 48)
    assert len(set(pair_sample_indices(RUN, 48))) == 12
