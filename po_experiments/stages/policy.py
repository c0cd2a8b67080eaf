"""Preference-optimisation stage (DPO family): train from the SFT model, checkpoint every k steps, resume.

A run killed at any point and started again with the same command continues from its last complete
checkpoint (model, optimizer, scheduler, RNG and data position come back through transformers' Trainer) and
ends where an uninterrupted run would have ended.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer
from trl import DPOConfig

from .. import distributed, run_length
from ..atomic import replace_dir
from ..checkpoints import STEP_DIR, StepCheckpoints, debug_callbacks, last_checkpoint
from ..errors import ConfigError
from ..models import load_model
from ..analysis.sample import select_pair_sample
from ..controllers import build_controller
from ..trainers.dpo import ComponentDPOTrainer
from ..trainers.loss_check import LOSS_CHECK, LossCheck
from .pairs import preference_data
from .common import trainer_kwargs

log = logging.getLogger(__name__)


@dataclass
class TrainedPolicy:
    model_dir: Path
    final_step: int
    final_loss: float | None
    resumed_from: str | None


def _seed_from_other_run(init_from: str, checkpoint_root: Path) -> Path:
    """Start from another run's checkpoint (e.g. DPO's step-6000 for the w/o-POS ablation) by copying it in."""
    source = Path(init_from).expanduser()
    if not STEP_DIR.match(source.name) or not (source / "trainer_state.json").exists():
        raise ConfigError(f"ablation.init_from={init_from}: not a checkpoint folder (expected .../checkpoints/step-N)")
    target = checkpoint_root / source.name
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target.with_name(target.name + ".copying"), dirs_exist_ok=True)
    (target.with_name(target.name + ".copying") / LOSS_CHECK).unlink(missing_ok=True)  # the other run's next update
    os.replace(target.with_name(target.name + ".copying"), target)
    return target


def _final_loss(log_history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else None


def finished_policy(run_dir: Path) -> TrainedPolicy | None:
    """The policy of a run whose training finished (`model/DONE`), or None."""
    model_dir = run_dir / "model"
    if not (model_dir / "DONE").exists():
        return None
    info = json.loads((model_dir / "train_result.json").read_text())
    log.info("policy already trained (step %d): %s", info["final_step"], model_dir)
    return TrainedPolicy(model_dir, info["final_step"], info["final_loss"], info.get("resumed_from"))


def write_final_policy(run_dir: Path, save, tokenizer, state, resume: Path | None) -> TrainedPolicy:
    """Write the final policy (`save(folder)`, called on every rank: ZeRO-3 gathers the weights to rank 0) aside
    and rename it into place: `model/DONE` means finished."""
    distributed.end_of_training()
    model_dir, tmp = run_dir / "model", run_dir / "model.tmp"
    info = {"final_step": state.global_step, "final_loss": _final_loss(state.log_history),
            "resumed_from": str(resume) if resume else None}
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    save(tmp)
    if not distributed.is_main():
        distributed.barrier()
        return TrainedPolicy(model_dir, info["final_step"], info["final_loss"], info["resumed_from"])
    tokenizer.save_pretrained(str(tmp))
    (tmp / "train_result.json").write_text(json.dumps(info, indent=2))
    (tmp / "log_history.json").write_text(json.dumps(state.log_history, indent=1))
    (tmp / "DONE").touch()
    replace_dir(tmp, model_dir)
    distributed.barrier()
    return TrainedPolicy(model_dir, info["final_step"], info["final_loss"], info["resumed_from"])


def loss_check(cfg, checkpoint_root: Path, args) -> LossCheck | None:
    """App. A's loss check at every checkpoint, on the G sample (it feeds G's filter). Measured while training even
    when G is off (analysis.enabled=false): G may be asked for later without training again (analysis.variants),
    and the check can only be measured during training."""
    if cfg.analysis.n_pairs < 1:
        return None
    measured_on = (f"the G sample: {cfg.analysis.n_pairs} training pairs (analysis.n_pairs, seed {cfg.seed}); "
                   f"{cfg.algo.name} loss with its schedule at step N; eval mode")
    return LossCheck(checkpoint_root, args.per_device_train_batch_size, measured_on)


def train_pairwise(cfg, sft_dir: Path, run_dir: Path, report_to: list[str]) -> TrainedPolicy:
    """The pairwise family's stage: the training pairs, then `train_policy`."""
    return train_policy(cfg, sft_dir, preference_data(cfg, sft_dir, AutoTokenizer.from_pretrained(sft_dir)), run_dir,
                        report_to)


def train_policy(cfg, sft_dir: Path, train_data, run_dir: Path, report_to: list[str]) -> TrainedPolicy:
    done = finished_policy(run_dir)
    if done is not None:
        return done

    checkpoint_root = run_dir / "checkpoints"
    resume = last_checkpoint(checkpoint_root)
    if resume is None and cfg.ablation.init_from:
        resume = distributed.main_first(lambda: _seed_from_other_run(cfg.ablation.init_from, checkpoint_root))
    if resume is not None:
        log.info("resuming from %s", resume)

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    args = DPOConfig(
        **trainer_kwargs(cfg.model.dpo, cfg, stage="dpo", output_dir=str(checkpoint_root), report_to=report_to),
        beta=cfg.algo.beta,
        max_length=cfg.model.max_length,
        precompute_ref_log_probs=cfg.runtime.precompute_ref,
        dataset_num_proc=None,
        run_name=run_dir.name,
    )
    model = load_model(sft_dir, cfg.model)  # after the arguments: under ZeRO-3 it loads partitioned
    check = loss_check(cfg, checkpoint_root, args)
    controller = build_controller(cfg, tokenizer, run_dir)  # None for controller=none
    if controller is not None and resume is not None:
        controller.restore(resume)
    trainer = ComponentDPOTrainer(
        model=model, args=args, train_dataset=train_data, processing_class=tokenizer,
        eval_dataset=select_pair_sample(cfg, train_data) if check else None,  # TRL adds its reference log-probs
        algo=cfg.algo, ablation=cfg.ablation, controller=controller,
        callbacks=[StepCheckpoints(checkpoint_root), *debug_callbacks(cfg), *([check] if check else [])],
    )
    # on the pairs TRL kept (a prompt alone filling max_length is dropped); every rank, so all stop together
    run_length.check_training(cfg, len(trainer.train_dataset), run_dir)
    if check:
        check.bind(trainer)
    if controller is not None:
        controller.start()  # its overhead is over the training loop's wall time
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if check:
        log.info("loss check (App. A): %.1f s of this job's training", check.seconds)
    if controller is not None and distributed.is_main():
        controller.finish()

    return write_final_policy(run_dir, lambda folder: trainer.save_model(str(folder)), tokenizer, trainer.state,
                              resume)
