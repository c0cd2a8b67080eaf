"""PPO-family stage: SFT policy + reference + value model + reward -> ComponentPPOTrainer -> final policy.

Critic-free estimators (GRPO, DAPO, RLOO, REINFORCE++) load no value model. `model.ppo.batch_size` counts the
responses of a rollout: `batch_size / algo.group_size` prompts, `group_size` responses each (1 for PPO).
Checkpoints (policy, value model, the rollout batch D_N, optimizer, scheduler, RNG) every `model.ppo.save_steps`
updates under `checkpoints/step-N/`; a killed run started again resumes from the last one.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl.experimental.ppo import PPOConfig

from .. import distributed, run_length
from ..checkpoints import debug_callbacks, last_checkpoint
from ..controllers import build_controller
from ..models import DTYPES, load_model, placement
from ..objectives.policy_gradient import group_size, needs_critic, settings
from ..rewards import build_reward, reward_model_dir
from ..trainers.ppo import ComponentPPOTrainer
from ..tasks import prompt_dataset
from .common import trainer_kwargs
from .policy import TrainedPolicy, finished_policy, write_final_policy

log = logging.getLogger(__name__)


def value_model(cfg, sft_dir: Path):
    """Initialised the usual way: from the reward model when one was trained, else from the SFT model."""
    source = reward_model_dir(cfg, sft_dir) if cfg.reward.kind == "learned" else sft_dir
    model = load_model(source, cfg.model, AutoModelForSequenceClassification, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = AutoTokenizer.from_pretrained(sft_dir).pad_token_id
    return model


def ppo_config(cfg, checkpoint_root: Path, report_to: list[str], prompts: int | None = None) -> PPOConfig:
    """TRL's PPOConfig for the stage. Its episodes count rollout rows (responses): with groups of k responses per
    prompt, an epoch over `prompts` prompts is prompts x k episodes (`run_length.ppo_updates`)."""
    hp, algo = cfg.model.ppo, cfg.algo
    kwargs = trainer_kwargs(hp, cfg, stage="ppo", output_dir=str(checkpoint_root), report_to=report_to)
    kwargs["save_strategy"] = "no"  # ComponentPPOTrainer writes its own checkpoints (with the rollout)
    kwargs["world_size"] = distributed.world()  # PPOConfig's field shadows TrainingArguments' (DeepSpeed reads it)
    if hp.max_steps > 0:  # TRL's PPO counts episodes (rollout rows), not updates
        kwargs["total_episodes"] = hp.max_steps * hp.batch_size
    elif prompts is not None and group_size(algo) > 1:
        kwargs["total_episodes"] = int(hp.epochs * prompts) * group_size(algo)
    return PPOConfig(
        **kwargs, response_length=hp.max_new_tokens, temperature=hp.temperature, stop_token="eos",
        kl_coef=algo.kl_coef, kl_estimator=settings(algo).kl_estimator, cliprange=algo.cliprange,
        cliprange_value=algo.cliprange_value, vf_coef=algo.vf_coef,
        gamma=algo.gamma, lam=algo.gae_lambda, num_ppo_epochs=algo.num_ppo_epochs, num_mini_batches=1,
        whiten_rewards=algo.whiten_rewards, num_sample_generations=0, missing_eos_penalty=None,
        local_rollout_forward_batch_size=kwargs["per_device_train_batch_size"], dataset_num_proc=None,
    )


def train_ppo_policy(cfg, sft_dir: Path, run_dir: Path, report_to: list[str]) -> TrainedPolicy:
    done = finished_policy(run_dir)
    if done is not None:
        return done

    checkpoint_root = run_dir / "checkpoints"
    resume = last_checkpoint(checkpoint_root)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    tokenizer.padding_side = "left"
    prompts, user_turns = prompt_dataset(cfg, tokenizer)
    run_length.check_training(cfg, len(prompts), run_dir)  # every rank, so that all stop together
    # Every rank scores text with a whole reward model outside DeepSpeed: loaded before PPOConfig exists, since
    # under ZeRO-3 from_pretrained partitions whatever it loads while that config is registered
    reward = build_reward(cfg, sft_dir, messages=user_turns or None)
    args = ppo_config(cfg, checkpoint_root, report_to, len(prompts))  # before the loads: ZeRO-3 partitions them
    policy = load_model(sft_dir, cfg.model)
    # frozen: inference only, so in model.dtype
    reference = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=DTYPES[cfg.model.dtype], **placement())
    set_seed(cfg.seed)  # the value head's init must not depend on whether SFT was trained in this process
    controller = build_controller(cfg, tokenizer, run_dir)  # None for controller=none
    if controller is not None and resume is not None:
        controller.restore(resume)
    trainer = ComponentPPOTrainer(
        args=args, processing_class=tokenizer, model=policy,
        ref_model=reference, value_model=value_model(cfg, sft_dir) if needs_critic(cfg.algo) else None,
        train_dataset=prompts,
        eval_dataset=prompts.select(range(min(8, len(prompts)))), reward=reward,
        algo=cfg.algo, ablation=cfg.ablation, top_p=cfg.model.ppo.top_p, max_grad_norm=cfg.model.ppo.max_grad_norm,
        checkpoint_root=checkpoint_root, save_steps=cfg.model.ppo.save_steps, callbacks=debug_callbacks(cfg),
        generation_batch_size=cfg.model.ppo.generation_batch_size, pure_low_precision=cfg.model.pure_low_precision,
        controller=controller,
    )
    if controller is not None:
        controller.start()  # its overhead is over the training loop's wall time
    trainer.train(resume_from=resume)
    if controller is not None and distributed.is_main():
        controller.finish()

    done = write_final_policy(run_dir, trainer.save_policy, tokenizer, trainer.state, resume)
    distributed.end_of_training()
    return done
