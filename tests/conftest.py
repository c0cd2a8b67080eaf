"""Shared fixtures: the tiny model, tokenizer and preference pairs built offline in a second."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def task():
    from po_experiments.data.synthetic import DictionaryTask

    return DictionaryTask.from_config()


@pytest.fixture(scope="session")
def tokenizer(task):
    from po_experiments.models import build_word_tokenizer

    return build_word_tokenizer(task.words)


def make_pairs(task, n: int, seed: int = 0) -> Dataset:
    """Pairs of two demonstrator samples per prompt, chosen by gold reward (enough for gradient tests)."""
    return task.ranked_demonstration_pairs(n, seed)


def nudge(model, scale: float = 0.05):
    """Move a model a little (in place, N(0, scale) per weight): a policy off its reference or behaviour policy, so
    omega, log-ratios and importance ratios differ between rows. Returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def float64_checkpoint(tiny_model):
    """(reference, checkpoint): the tiny model in float64 and a nudged copy with eager attention (vmap and forward
    mode need it), as the G tests analyse them."""
    ref = tiny_model.double().eval()
    model = nudge(copy.deepcopy(ref))
    model.config._attn_implementation = "eager"
    return ref, model


def load_script(name: str):
    """A script from scripts/ as a module (the benchmarks' smoke tests call their `main`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_model(tokenizer):
    from po_experiments.models import build_tiny_model

    arch = OmegaConf.create({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                             "intermediate_size": 64, "max_position_embeddings": 64})
    return build_tiny_model(arch, tokenizer, seed=0)


def dpo_trainer(model, tokenizer, pairs, tmp_path, algo: dict, ablation: dict | None = None, trainer_cls=None,
                **config):
    """A ComponentDPOTrainer (or stock DPOTrainer) with an explicit reference copy and no precomputation."""
    from trl import DPOConfig

    from po_experiments.trainers.dpo import ComponentDPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=config.pop("batch", 8),
                     report_to=[], max_length=32, dataset_num_proc=None, beta=algo.get("beta", 0.1),
                     precompute_ref_log_probs=False, save_strategy="no", seed=0, bf16=False, **config)
    ref = copy.deepcopy(model)
    if trainer_cls is not None:
        return trainer_cls(model=model, ref_model=ref, args=args, train_dataset=pairs, processing_class=tokenizer)
    algo_cfg = OmegaConf.create({"name": "dpo", "beta": 0.1, "components": ["TOT"], **algo})
    ablation_cfg = OmegaConf.create({"name": "none", "drop": [], "start_step": 0, "stop_step": None,
                                     **(ablation or {})})
    return ComponentDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=pairs,
                               processing_class=tokenizer, algo=algo_cfg, ablation=ablation_cfg)


PPO_ALGO = {"name": "ppo", "family": "ppo", "weighting": "ppo", "components": ["TOT"], "lam": None, "t3": None,
            "tau": None}


@pytest.fixture
def ppo(task, tokenizer, tiny_model, tmp_path):
    """A ComponentPPOTrainer on the tiny model with the gold reward, float64 for exact comparisons."""
    from transformers import GPTNeoXForSequenceClassification
    from trl.experimental.ppo import PPOConfig

    from po_experiments.rewards import GoldReward
    from po_experiments.trainers.ppo import ComponentPPOTrainer

    def build(algo=None, ablation=None, model=None, save_steps=0, prompt_words=None):
        policy = copy.deepcopy(model or tiny_model).double()
        torch.manual_seed(0)  # the same value-head init in every trainer a test builds
        value_config = copy.deepcopy(policy.config)
        value_config.num_labels = 1
        value = GPTNeoXForSequenceClassification(value_config).double()
        texts = task.preference_prompts(32 if prompt_words is None else 400, 0)
        if prompt_words is not None:  # equal lengths: no left padding (eager attention in float64 needs that)
            texts = [t for t in texts if len(task.parse_prompt(t)) == prompt_words][:32]
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts]
        args = PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         num_train_epochs=1, response_length=6, temperature=1.0, stop_token="eos", learning_rate=1e-4,
                         num_ppo_epochs=2, num_mini_batches=1, num_sample_generations=0, report_to=[], bf16=False,
                         seed=0, save_strategy="no", local_rollout_forward_batch_size=8, kl_coef=0.05,
                         activation_checkpointing=False)  # as the stage sets it for the tiny model (TRL: on)
        data = Dataset.from_dict({"input_ids": prompts})
        ablation_cfg = OmegaConf.create({"name": "none", "drop": [], "start_step": 0, "stop_step": None,
                                         **(ablation or {})})
        return ComponentPPOTrainer(args=args, processing_class=tokenizer, model=policy,
                                   ref_model=copy.deepcopy(policy), value_model=value, train_dataset=data,
                                   eval_dataset=data.select(range(8)), reward=GoldReward(task),
                                   algo=OmegaConf.create({**PPO_ALGO, **(algo or {})}), ablation=ablation_cfg,
                                   checkpoint_root=tmp_path / "checkpoints", save_steps=save_steps)
    return build



def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)
