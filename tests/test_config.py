"""Every config composes; bad values fail at composition or validation with a message naming the key."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments.config import validate
from po_experiments.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(overrides=()):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.cache_dir=/tmp/y", *overrides])


# The paper gives no cDPO / cPPO / hPPO case for Llama-3-8B: those must be set explicitly.
NO_CASE = {("llama3", "cdpo"): "algo.t1", ("llama3", "cppo"): "algo.lam", ("llama3", "cppo_mid"): "algo.lam",
           ("llama3", "hppo"): "algo.t3"}


PAPER_ALGOS = {"dpo", "cdpo", "ppo", "cppo", "cppo_mid", "hppo"}  # every model x these in the fast tier; others: tiny


@pytest.mark.parametrize("model,algo", [(m, a) if m == "tiny" or a in PAPER_ALGOS else
                                        pytest.param(m, a, marks=pytest.mark.slow)
                                        for m, a in product(options("model"), options("algo"))])
def test_every_model_and_algorithm_compose_and_validate(model, algo):
    cfg = make([f"model={model}", f"algo={algo}"])
    if (model, algo) in NO_CASE:
        with pytest.raises(ConfigError, match=NO_CASE[model, algo].replace(".", r"\.")):
            validate(cfg)
        return
    validate(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in ("ablation", "data", "logger", "reward")
                                          for o in options(g)])
@pytest.mark.parametrize("algo", ["dpo", "ppo"])
def test_every_option_of_every_group_composes(group, option, algo):
    overrides = [f"{group}={option}", f"algo={algo}"]
    if group == "data" and option == "paper" and algo == "ppo":
        overrides.append("reward=armorm")  # the gold and learned rewards exist only for the synthetic task
    validate(make(overrides))


def test_real_models_select_the_paper_data_and_hyper_parameters():
    cfg = make(["model=pythia", "algo=cdpo"])
    assert cfg.data.name == "paper" and cfg.model.path == "EleutherAI/pythia-2.8b"
    assert (cfg.model.dpo.batch_size, cfg.model.dpo.learning_rate) == (16, 5e-7)  # 16 pairs = the paper's 32 sequences
    assert (cfg.algo.t1, cfg.algo.t2, cfg.algo.beta) == (2500, 5500, 0.1)
    qwen = make(["model=qwen3", "algo=cdpo"])
    assert (qwen.model.dpo.batch_size, qwen.model.dpo.learning_rate, qwen.algo.t1, qwen.algo.t2) == (512, 5e-5, 40, 160)
    llama = make(["model=llama3"])
    assert (llama.model.dpo.batch_size, llama.model.dpo.learning_rate) == (256, 1e-5)


@pytest.mark.parametrize("override,key", [
    ("seed=abc", "seed"),
    ("algo.bta=0.2", "bta"),
    ("algo=dpo_typo", "algo"),
    ("algo.lam=0.5", "lam"),  # a pairwise objective has no cPPO weight
    ("eval.judge=oracle", "judge"),
    ("model.dpo.batch_size=big", "batch_size"),
    ("data.on_invalid=ignore", "on_invalid"),
])
def test_composition_errors_name_the_key(override, key):
    overrides = [override, "data=paper"] if override.startswith("data.on_invalid") else [override]
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as err:
        validate(make(overrides))
    assert key in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("overrides,key", [
    (["algo=cdpo", "algo.t1=100", "algo.t2=50"], "algo.t2"),
    (["algo=cdpo", "algo.t1=-1"], "algo.t1"),
    (["ablation=dpo_wo_neg_early", "ablation.start_step=-3"], "ablation.start_step"),
    (["ablation=dpo_wo_pos_late", "ablation.start_step=10", "ablation.stop_step=5"], "ablation.stop_step"),
    (["data.label_flip_p=1.5"], "data.label_flip_p"),
    (["data.wrong_p=-0.1"], "data.wrong_p"),
    (["model.dpo.save_steps=-1"], "model.dpo.save_steps"),
    (["model.dpo.learning_rate=0"], "model.dpo.learning_rate"),
    (["model.dpo.logging_steps=3"], "model.dpo.logging_steps"),
    (["algo.components=[TOT,FOO]"], "algo.components"),
    (["algo.beta=0"], "algo.beta"),
    (["ablation.drop=[POSITIVE]"], "ablation.drop"),
    (["model=llama3", "algo=cdpo"], "algo.t1"),
    (["model=pythia", "eval.judge=gold"], "eval.judge"),
    (["algo=cppo", "algo.lam=1.5"], "algo.lam"),
    (["algo=cppo_mid", "algo.lam=-0.1"], "algo.lam"),
    (["algo=hppo", "algo.tau=0"], "algo.tau"),
    (["algo=hppo", "algo.t3=-2"], "algo.t3"),
    (["algo=ppo", "algo.weighting=cppo_bottom"], "algo.weighting"),
    (["algo=ppo", "algo.cliprange=1.5"], "algo.cliprange"),
    (["algo=ppo", "model.ppo.top_p=0"], "model.ppo.top_p"),
    (["algo=ppo", "model=pythia", "reward=gold"], "reward.kind"),
    (["algo=ppo", "reward=armorm", "reward.path=null"], "reward.path"),
    (["eval.judge=reward_model"], "eval.reward_model.path"),
    (["eval.judge=alpaca_eval", "eval.alpaca_eval.annotator=local"], "eval.alpaca_eval.local_model"),
    (["eval.checkpoints=some"], "eval.checkpoints"),
    (["eval.prompts=hh_rlhf"], "eval.prompts"),
    (["eval.n_prompts=0"], "eval.n_prompts"),
    (["eval.max_new_tokens=-1"], "eval.max_new_tokens"),
])
def test_validation_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make(overrides))


def _run(args, env_extra=None, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    start = time.time()
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time() - start


@pytest.mark.slow
def test_run_py_reports_a_bad_value_in_one_line(tmp_path):
    proc, _ = _run(["algo=cdpo", "algo.t1=10", "algo.t2=5", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2
    assert "algo.t2" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_offline_real_model_fails_fast_with_a_hint(tmp_path):
    proc, seconds = _run(["model=pythia", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "EleutherAI/pythia-2.8b" in proc.stderr and "model.path=" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 60  # seconds of imports, not a network time-out
    assert not (tmp_path / "cache" / "sft").exists()  # nothing was started


@pytest.mark.slow
def test_missing_reward_model_path_names_it(tmp_path):
    proc, seconds = _run(["algo=ppo", "reward=armorm", f"reward.path={tmp_path}/no_rm", f"hydra.run.dir={tmp_path}/r",
                          f"paths.cache_dir={tmp_path}/cache"])
    assert proc.returncode == 2 and "reward.path" in proc.stderr and f"{tmp_path}/no_rm" in proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 60 and not (tmp_path / "cache" / "sft").exists()


@pytest.mark.slow
def test_api_judge_without_a_key_fails_before_training(tmp_path):
    proc, seconds = _run(["eval.judge=alpaca_eval", f"hydra.run.dir={tmp_path}/run"], {"OPENAI_API_KEY": ""})
    assert proc.returncode == 2 and "OPENAI_API_KEY" in proc.stderr and "annotator=local" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_offline_reward_hub_id_fails_fast(tmp_path):
    proc, seconds = _run(["algo=ppo", "reward=armorm", f"hydra.run.dir={tmp_path}/r", f"paths.cache_dir={tmp_path}/c"])
    assert proc.returncode == 2 and "RLHFlow/ArmoRM-Llama3-8B-v0.1" in proc.stderr and "reward.path" in proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 60


@pytest.mark.slow
def test_missing_local_model_path_names_it(tmp_path):
    proc, _ = _run(["model=pythia", f"model.path={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode == 2 and f"{tmp_path}/nowhere" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ run identity

def run_dir_name(overrides) -> str:
    """The name `hydra.run.dir` / `hydra.sweep.subdir` give a job launched with these overrides."""
    from po_experiments.config import _run_name

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return _run_name(cfg.hydra.overrides.task)


NON_IDENTITY_OVERRIDES = [  # one per NOT_IDENTITY section, plus sub-keys and an added key
    "analysis.dprime=train", "analysis.n_pairs=7", "analysis.enabled=false", "eval.n_prompts=3",
    "eval.judge=none", "generation.backend=vllm", "plan.gpus=8", "runtime.threads=1", "debug.kill_at_step=3",
    "dry_run=true", "logger=none", "logger.mode=disabled", "paths.cache_dir=/elsewhere", "name=other",
    "experiment=fig7",
]


def test_analysis_and_evaluation_settings_are_no_part_of_a_run_name():
    """Rule: whole sections (config.NOT_IDENTITY) never name a run, so Fig. 7 (analysis.dprime=train) or a run
    asked for with G / another judge maps to the run dir that trained it."""
    from po_experiments.config import NOT_IDENTITY, is_identity_key

    base = ["seed=1", "algo.beta=0.3"]
    assert run_dir_name(base) == "algo.beta=0.3,seed=1"
    assert {o.split("=")[0].split(".")[0] for o in NON_IDENTITY_OVERRIDES} == set(NOT_IDENTITY)
    assert run_dir_name([*NON_IDENTITY_OVERRIDES, *base]) == "algo.beta=0.3,seed=1"
    assert run_dir_name(["analysis.dprime=train"]) == "default"
    assert not is_identity_key("analysis.new_setting") and is_identity_key("analysis_like")


def test_identity_overrides_keep_the_names_hydra_gave_them():
    """Rule: the name of a command without non-identity keys is Hydra's override_dirname, as before (run dirs named
    before keep their names); every training setting stays in it (a group inside `experiment/` included)."""
    import re

    overrides = ["experiment/method=cdpo_case2", "experiment/model=tiny", "algo.beta=0.2", "mode=fast",
                 "algo.components=[POS,NEG]", "sft.enabled=false", "seed=3", "model.dpo.max_steps=50"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=["experiment=fig4", *overrides], return_hydra_config=True)
    hydra_name = ",".join(sorted(overrides))  # override_dirname with the old exclude_keys (experiment excluded)
    assert run_dir_name(["experiment=fig4", *overrides]) == re.sub(r"[^A-Za-z0-9=,._+-]", "_", hydra_name)
    assert "algo.beta=0.2" in run_dir_name(["experiment=fig4", *overrides])
    assert cfg.hydra.job.override_dirname.startswith("algo.beta=0.2")  # Hydra's own, unused: nothing excluded
