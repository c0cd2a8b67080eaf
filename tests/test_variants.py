"""Analysis without retraining (analysis.variants): a run's own G table stays in the run dir, other analysis
settings get `analysis_<key>/` folders of their own, found again by the same settings."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments.analysis import variants

CONF = Path(__file__).resolve().parents[1] / "conf"


def make(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.cache_dir=/tmp/y", *overrides])


def finished_run(root: Path, steps=(4, 8)) -> Path:
    run = root / "run"
    for step in steps:
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / "record.json").write_text("{}")
    (run / "model").mkdir()
    return run


def write_table(folder: Path, steps, dprime="heldout") -> None:
    pd.DataFrame({"step": list(steps), "component": "TOT", "layer_group": "all", "G": 1.0,
                  "dprime": dprime}).to_csv(folder / variants.TABLE, index=False)


def test_the_first_settings_are_the_runs_own_and_others_get_a_keyed_folder(tmp_path):
    run = finished_run(tmp_path)
    own = make("analysis.n_pairs=24")
    assert variants.prepare(own, run) == run  # never analysed (e.g. trained by Fig. 4 without G): its own
    assert json.loads((run / variants.SETTINGS).read_text())["n_pairs"] == 24
    write_table(run, (4, 8))
    assert not variants.pending(own, run)
    assert variants.table_dir(make("analysis.n_pairs=24", "analysis.method=ghost", "analysis.chunk=2"), run) == run

    fig7 = make("analysis.n_pairs=24", "analysis.dprime=train")
    folder = variants.prepare(fig7, run)
    assert folder.parent == run and folder.name.startswith("analysis_dprime-train-")
    assert all((folder / name).resolve() == (run / name).resolve() for name in ("checkpoints", "model", "analysis"))
    assert sorted(int(p.name.split("-")[1]) for p in (folder / "checkpoints").iterdir()) == [4, 8]
    assert variants.recorded_settings(folder) == variants.analysis_settings(fig7)
    assert variants.pending(fig7, run)
    write_table(folder, (4,), "train")
    assert variants.pending(fig7, run)  # step 8 is missing: the folder continues where it stopped
    write_table(folder, (4, 8), "train")
    assert not variants.pending(fig7, run) and variants.prepare(fig7, run) == folder  # found again
    batch = variants.table_dir(make("analysis.n_pairs=24", "analysis.dpo_batch_size=8"), run)
    assert batch not in (run, folder) and batch.name.startswith("analysis_dprime-heldout-")
    assert not variants.pending(make("analysis.enabled=false", "analysis.dprime=train"), run)


def test_a_table_of_before_the_records_is_the_runs_own(tmp_path):
    """Run dirs analysed before settings were recorded: the table's D' comes from its dprime column; the record
    is written the first time the run is asked for G, whatever the settings."""
    run = finished_run(tmp_path)
    write_table(run, (4, 8), "heldout")
    train = make("analysis.dprime=train")
    assert variants.prepare(train, run).name.startswith("analysis_dprime-train-")
    recorded = json.loads((run / variants.SETTINGS).read_text())
    assert recorded["dprime"] == "heldout" and recorded["targets"] == ["dprime"]  # no target column: D' alone
    d_only = make("analysis.targets=[dprime]")
    assert variants.table_dir(d_only, run) == run and not variants.pending(d_only, run)
    # G against the other targets is not in that table: asked for, it goes to a folder of its own
    assert variants.table_dir(make(), run).name.startswith("analysis_dprime-heldout-")


def test_a_record_of_before_the_targets_holds_dprime_only(tmp_path):
    run = finished_run(tmp_path)
    settings = variants.analysis_settings(make())
    old = {k: v for k, v in settings.items() if k not in ("targets", "n_target")}
    (run / variants.SETTINGS).write_text(json.dumps(old))
    assert variants.table_dir(make("analysis.targets=[dprime]"), run) == run
    assert variants.table_dir(make(), run) != run


def test_a_setting_added_later_at_its_default_matches_older_records(tmp_path):
    run = finished_run(tmp_path)
    cfg = make()
    settings = variants.analysis_settings(cfg)
    (run / variants.SETTINGS).write_text(json.dumps({k: v for k, v in settings.items() if k != "ppo_all_norms"}))
    assert variants.table_dir(cfg, run) == run
    assert variants.table_dir(make("analysis.ppo_all_norms=true"), run) != run


def test_a_finished_run_asked_for_other_eval_settings_says_it_keeps_its_win_rates(caplog):
    from po_experiments.pipeline import output_settings, warn_other_eval_settings

    summary = {"eval_settings": output_settings(make("eval.n_prompts=32"))}
    assert "batch_size" not in summary["eval_settings"] and "judge" not in summary["eval_settings"]
    with caplog.at_level("WARNING"):
        warn_other_eval_settings(make("eval.n_prompts=32", "eval.batch_size=4", "eval.judge=none"), summary)
        assert not caplog.records
        warn_other_eval_settings(make("eval.n_prompts=64"), summary)
    assert "eval.n_prompts=32 (asked: 64)" in caplog.text
