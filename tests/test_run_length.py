"""A run's length in its step unit (the paper's step numbers taken literally) and the check that every step-valued
setting lies inside it: at validation from the data's known size, and again on the rows actually trained on."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments import plan, run_length
from po_experiments.errors import ConfigError
from tests.test_experiments import CONF


def make(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=["paths.output_dir=/nowhere", "paths.cache_dir=/nowhere", *overrides])
    return cfg


def length(overrides) -> dict:
    cfg = make(overrides)
    return run_length.check(cfg, plan.rows(cfg, "preferences"), where="test")


@pytest.mark.parametrize("model, algo, steps, checkpoints", [
    ("pythia", "dpo", 7642, 7),   # 2 x ceil(61,135 / 16): the paper's "batch size 32" read as 32 sequences
    ("qwen3", "dpo", 240, 6),     # 2 x ceil(61,135 / 512) = 2 x 120: the cases' t2 = 240 is the end
    ("llama3", "dpo", 478, 11),   # 2 x ceil(61,135 / 256)
    ("pythia", "ppo", 1433, 3),   # 3 epochs of 128-prompt rollouts (TRL: ceil(int(3 x 61,135) / 128))
    ("qwen3", "ppo", 1433, 11),
    ("llama3", "ppo", 1911, 4),   # 1 epoch of 32-prompt rollouts
])
def test_the_paper_models_run_lengths_and_checkpoints(model, algo, steps, checkpoints):
    cfg = make([f"model={model}", f"algo={algo}", "plan.gpus=8", "plan.gpu_memory_gb=80", "plan.host_memory_gb=1000"])
    the_plan = plan.make_plan(cfg)
    assert the_plan["run_length"]["steps"] == steps
    assert the_plan["stages"][algo]["steps"] == steps and the_plan["stages"][algo]["checkpoints"] == checkpoints
    assert the_plan["run_length"]["unit"].startswith("PPO update" if algo == "ppo" else "optimizer step on")


def test_pythia_cases_and_windows_lie_inside_its_7642_steps():
    """Every Pythia step number of the paper: cDPO cases, w/o NEG's first 3000 steps, w/o POS from 6000."""
    for t1, t2 in ((2500, 5500), (2500, 6500), (3000, 8000)):
        record = length(["model=pythia", "algo=cdpo", f"algo.t1={t1}", f"algo.t2={t2}"])
        assert all(s["inside"] for s in record["settings"]), record
    for window in (["ablation=dpo_wo_neg_early", "ablation.stop_step=3000"],
                   ["ablation=dpo_wo_pos_late", "ablation.start_step=6000"]):
        assert all(s["inside"] for s in length(["model=pythia", *window])["settings"])


@pytest.mark.parametrize("overrides, key", [
    (["model=pythia", "algo=cdpo", "algo.t1=7642", "algo.t2=9000"], "algo.t1"),
    (["model=pythia", "algo=cdpo", "algo.t1=3000", "algo.t2=9000"], "algo.t2"),  # lambda reaches only 0.77
    (["model=pythia", "ablation=dpo_wo_pos_late", "ablation.start_step=8000"], "ablation.start_step"),
    (["model=pythia", "ablation=dpo_wo_neg_early", "ablation.stop_step=9000"], "ablation.stop_step"),
    (["model=pythia", "ablation=dpo_wo_pos_late", "ablation.init_from=/runs/x/checkpoints/step-8000"],
     "ablation.init_from"),
    (["model=pythia", "model.dpo.save_steps=8000"], "model.dpo.save_steps"),
    (["model=qwen3", "algo=dpo", "model.dpo.epochs=1", "algo=cdpo", "algo.t1=120", "algo.t2=240"], "algo.t1"),
    (["model=pythia", "algo=hppo", "algo.t3=1500"], "algo.t3"),
    (["model=pythia", "algo=ppo", "model.ppo.epochs=1", "model.ppo.save_steps=500"], "model.ppo.save_steps"),
])
def test_a_step_setting_outside_the_run_fails_naming_its_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "=") as err:
        length(overrides)
    assert "steps of" in str(err.value)
    cfg = make([*overrides, "plan.check_steps=false"])  # the escape hatch warns instead
    record = run_length.check(cfg, plan.rows(cfg, "preferences"), where="test")
    assert not next(s for s in record["settings"] if s["key"] == key)["inside"]


def test_the_check_at_training_uses_the_rows_loaded(tmp_path):
    """A setting inside the planned run but outside the run the loaded rows give stops before training."""
    cfg = make(["algo=cdpo", "algo.t1=100", "algo.t2=110"])  # planned from 4,000 prompts: 126 steps
    assert all(s["inside"] for s in run_length.check(cfg, plan.rows(cfg, "preferences"), where="plan")["settings"])
    with pytest.raises(ConfigError, match=r"algo\.t1=100 .*the training data: 94 steps"):
        run_length.check_training(cfg, 3000, tmp_path)  # 3,000 pairs kept: 2 x ceil(3000 / 64) = 94 steps
    assert not (tmp_path / "run_length.json").exists()
    record = run_length.check_training(make(["algo=cdpo", "algo.t1=50", "algo.t2=90"]), 3000, tmp_path)
    assert record["steps"] == 94 and (tmp_path / "run_length.json").exists()


def test_plan_table_lists_each_plan_and_flags_one_outside(tmp_path, capsys):
    from conftest import load_script

    table = load_script("plan_table")
    for name, overrides in (("cdpo", ["algo=cdpo", "algo.t1=2500", "algo.t2=5500"]),
                            ("late", ["ablation=dpo_wo_pos_late", "ablation.start_step=6000"])):
        cfg = make(["model=pythia", "plan.gpus=8", "plan.gpu_memory_gb=80", "plan.host_memory_gb=1000", *overrides])
        plan.write_plan(plan.make_plan(cfg), tmp_path / name)
    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| cdpo | pythia | 7642 | 7 | t1=2500, t2=5500 | yes |" in out and "start_step=6000" in out
    cfg = make(["model=pythia", "plan.check_steps=false", "algo=cdpo", "algo.t1=9000", "algo.t2=9500"])
    plan.write_plan(plan.make_plan(cfg), tmp_path / "outside")
    assert table.main([str(tmp_path)]) == 1 and "t1=9000 (OUTSIDE)" in capsys.readouterr().out
