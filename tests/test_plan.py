"""The dry-run plan: model sizes from architectures, the paper's global batch kept by the chosen micro-batch and
accumulation, every paper model fitting one 8 x 80 GB node, and a clear stop when a stage does not fit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product

import pytest
from hydra import compose, initialize_config_dir

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments import plan
from po_experiments.config import validate
from po_experiments.errors import ConfigError

from conftest import REPO


def make(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=["paths.output_dir=/tmp/x", "paths.cache_dir=/tmp/y", *overrides])
    validate(cfg)
    return cfg


CASES = {"cdpo": ["algo.t1=100", "algo.t2=400"]}  # llama3 has no paper cDPO case: set one inside its 478 steps


@pytest.mark.parametrize("model,algo", list(product(["pythia", "qwen3", "llama3"], ["dpo", "cdpo", "ppo"])))
def test_paper_models_fit_one_node_of_8_gpus(model, algo):
    cfg = make(f"model={model}", f"algo={algo}", "dry_run=true", "plan.gpus=8", "plan.gpu_memory_gb=80",
               *(CASES.get(algo, []) if model == "llama3" else []))
    the_plan = plan.check(plan.resolve_deepspeed(cfg))
    assert the_plan["fits"], plan.format_plan(the_plan)
    family = "ppo" if algo == "ppo" else "dpo"
    assert set(the_plan["stages"]) == {"sft", family, "win_rate", "analysis"}
    for stage in ("sft", family):
        s = the_plan["stages"][stage]
        hp = cfg.model[stage]
        assert s["per_device_batch"] * s["grad_accum"] * 8 == hp.batch_size  # the paper's global batch, kept
        assert s["peak_gpu_gb"] <= 80 * cfg.plan.headroom and s["steps"] > 0


def dry_run(run_dir, *overrides) -> subprocess.CompletedProcess:
    """`python run.py <overrides> dry_run=true` as a user types it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "run.py", *overrides, "dry_run=true", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a subprocess or a training run: the fast tier stays under 3 minutes
def test_a_stage_that_does_not_fit_stops_the_run_naming_it(tmp_path):
    proc = dry_run(tmp_path, "model=llama3", "algo=ppo", "plan.gpus=1", "plan.gpu_memory_gb=24")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stage ppo needs" in proc.stderr and "stage sft needs" in proc.stderr
    written = json.loads((tmp_path / "plan.json").read_text())
    assert not written["fits"] and not written["stages"]["ppo"]["fits"]
    for key in ("steps", "checkpoints", "per_device_batch", "grad_accum", "peak_gpu_gb", "host_gb", "fits"):
        assert key in written["stages"]["sft"]


@pytest.mark.slow  # a subprocess or a training run: the fast tier stays under 3 minutes
def test_dry_run_of_the_pythia_dpo_run_writes_its_plan(tmp_path):
    proc = dry_run(tmp_path, "model=pythia", "algo=dpo", "plan.gpus=8", "plan.gpu_memory_gb=80")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "plan for pythia" in proc.stdout
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["fits"] and written["model"]["master_weights"] == "float32"
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()  # nothing ran


def test_a_run_whose_plan_does_not_fit_fails_at_validation():
    cfg = make("plan.gpu_memory_gb=0.001", "plan.host_memory_gb=0.001")
    with pytest.raises(ConfigError, match="plan: stage sft needs"):
        plan.check(cfg)
    plan.check(make("plan.gpu_memory_gb=0.001", "plan.host_memory_gb=0.001", "plan.check=false"))  # warns only


@pytest.mark.parametrize("kind", ["gpt_neox", "llama", "qwen3"])
def test_parameter_count_from_the_architecture_matches_transformers(kind):
    import transformers

    small = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=160, vocab_size=300)
    if kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(**small, tie_word_embeddings=False)
        model = transformers.GPTNeoXForCausalLM(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**small, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(config)
    shape = plan.Shape.from_hf_config(config.to_dict())
    counted = sum(p.numel() for p in model.parameters())
    # GPTNeoX has biases (a few hundred here) the count leaves out: they are negligible at real sizes
    assert abs(shape.n_params - counted) / counted < (0.05 if kind == "gpt_neox" else 1e-9), (shape.n_params, counted)


def test_stored_shapes_are_the_paper_models_sizes():
    sizes = {m: plan.model_shape(make(f"model={m}").model).n_params for m in ("pythia", "qwen3", "llama3")}
    assert abs(sizes["pythia"] - 2.775e9) / 2.775e9 < 0.01
    assert abs(sizes["qwen3"] - 1.72e9) / 1.72e9 < 0.01
    assert abs(sizes["llama3"] - 8.03e9) / 8.03e9 < 0.01


def test_the_planner_chooses_the_micro_batch_the_trainers_use():
    cfg = make("plan.gpus=0")
    assert plan.micro_batch(cfg, "dpo") == cfg.model.dpo.batch_size  # the tiny model: the whole batch fits
    squeezed = make("model=pythia", "plan.gpus=1", "plan.gpu_memory_gb=80")
    b = plan.micro_batch(squeezed, "sft")
    assert 1 <= b < squeezed.model.sft.batch_size and squeezed.model.sft.batch_size % b == 0


def test_deepspeed_auto_picks_the_least_sharding_that_fits():
    one = plan.resolve_deepspeed(make("model=pythia", "plan.gpus=1", "plan.gpu_memory_gb=80"))
    assert one.deepspeed.name == "none"  # one process: nothing to shard over
    llama = plan.resolve_deepspeed(make("model=llama3", "plan.gpus=8", "plan.gpu_memory_gb=80"))
    assert llama.deepspeed.name == "zero3" and llama.deepspeed.config.zero_optimization.stage == 3


@pytest.mark.slow  # a subprocess or a training run: the fast tier stays under 3 minutes
def test_memory_model_smoke():
    from conftest import load_script

    (result,) = load_script("measure_memory").main(["--sizes", "tiny", "--tokens", "32", "--steps", "1"])
    assert result["measured_gb"] > 0 and result["plan_gb"] > 0 and result["params"] == pytest.approx(
        result["plan_params"], rel=0.05)
