"""What the training stages share: Trainer arguments from a `StageHparams`.

`generate` (greedy/sampled generation with transformers) lives in generation/local.py and is re-exported here."""
from __future__ import annotations

import logging

import torch
from accelerate import PartialState

from ..generation.local import generate  # noqa: F401  (re-exported: stages, tests and scripts import it here)
from ..models import activation_checkpointing, autocast_dtype, tf32_available

log = logging.getLogger(__name__)


def batch_split(global_batch: int, per_device: int | None) -> tuple[int, int]:
    """(per-device batch, accumulation steps) giving `global_batch` over the processes of this job."""
    world = PartialState().num_processes
    per_device = per_device or max(1, global_batch // world)
    accumulation, rest = divmod(global_batch, per_device * world)
    if rest or accumulation == 0:
        raise ValueError(f"batch_size={global_batch} is not a multiple of per_device_batch_size={per_device} x "
                         f"{world} processes")
    return per_device, accumulation


def deepspeed_config(cfg) -> dict | None:
    """The run's DeepSpeed config (conf/deepspeed/) as a plain dict for TrainingArguments, or None."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.deepspeed.config, resolve=True) if cfg.deepspeed.config is not None else None


def trainer_kwargs(hp, cfg, *, stage: str, output_dir: str, report_to: list[str]) -> dict:
    """Keyword arguments shared by SFTConfig, DPOConfig, RewardConfig and PPOConfig (all TrainingArguments), from
    the stage's hyper-parameters `hp` (`cfg.model.<stage>`) and the run's config (seed, precision, DeepSpeed). The
    per-device micro-batch is `hp.per_device_batch_size`, or else the plan's (the largest that fits the device)."""
    from .. import plan

    per_device, accumulation = batch_split(hp.batch_size, hp.per_device_batch_size or plan.micro_batch(cfg, stage))
    seed = cfg.sft.seed if stage == "sft" else cfg.seed  # one SFT model per model, shared by every PO seed
    mixed = autocast_dtype(cfg.model)
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        logging_steps=hp.logging_steps,
        save_strategy="steps" if hp.save_steps > 0 else "no",
        save_steps=hp.save_steps if hp.save_steps > 0 else 500,
        seed=seed,
        data_seed=seed,
        bf16=mixed == "bfloat16",  # autocast over float32 master weights (models.training_dtype), CPU too
        fp16=mixed == "float16",
        tf32=True if tf32_available() else None,
        activation_checkpointing=activation_checkpointing(cfg.model),
        activation_checkpointing_kwargs={"use_reentrant": False},  # no reentrant autograd: works with frozen inputs
        full_determinism=cfg.runtime.deterministic,  # torch's deterministic kernels (slower on GPUs)
        report_to=report_to,
        dataloader_num_workers=0,
        disable_tqdm=False,
        deepspeed=deepspeed_config(cfg),
        use_cpu=not torch.cuda.is_available(),  # on CPU, accelerate makes a gloo group of the job's processes
        ddp_timeout=cfg.runtime.dist_timeout_s,
    )
