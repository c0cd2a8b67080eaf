"""Where a run's G for the analysis settings asked for lives, so that a finished run analyses again for new settings.

Analysis settings are no part of a run's identity (config.NOT_IDENTITY): the same run dir is asked for G by Fig. 1
(heldout D'), by Fig. 7 (analysis.dprime=train), by `scripts/analyse_run.py` with other sample sizes, or not at all
(the win-rate presets). The settings that determine G are the `analysis` section's fields but the `how` ones
(config.AnalysisConfig). The run dir's own table (`alignment.csv`) holds the first settings it was analysed with
(normally the command that trained it); any other settings go to `<run dir>/analysis_<key>/`, key =
`dprime-<dprime>-<hash of the settings>`. Each folder records its settings in `alignment_settings.json`, so the
same settings find their folder again (analysed checkpoints are skipped) and the figures tell the tables apart.
A keyed folder links the run's `checkpoints/`, `model/` and `analysis/` (the D' answers, cached by their own key),
so the analysis stage runs in it as in a run dir.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pandas as pd

from .. import distributed
from ..cache import config_hash
from ..checkpoints import step_dirs
from ..config import AnalysisConfig, stage_settings

log = logging.getLogger(__name__)
TABLE = "alignment.csv"
SETTINGS = "alignment_settings.json"
PREFIX = "analysis_"
LINKED = ("checkpoints", "model", "analysis")  # what the analysis reads from the run dir


def analysis_settings(cfg) -> dict:
    """The settings that determine G: the analysis section but its `how` fields (method, chunk, enabled, ...)."""
    return stage_settings(cfg.analysis, AnalysisConfig)


def analysis_key(settings: dict) -> str:
    """A folder name readable for the D' (Fig. 7b: `dprime-train-<hash>`) and unique for every setting."""
    return f"dprime-{settings['dprime']}-{config_hash(settings)[:8]}"


# what a table written before a field existed holds, where that is not the field's default: G against D' alone
LEGACY = {"targets": ["dprime"]}


def _defaults() -> dict:
    """The schema's defaults of the keyed fields: what a record written before a field existed meant by it."""
    out = {}
    for f in dataclasses.fields(AnalysisConfig):
        if f.metadata.get("how"):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {**out, **LEGACY}


def recorded_settings(folder: Path) -> dict | None:
    path = folder / SETTINGS
    return {**_defaults(), **json.loads(path.read_text())} if path.exists() else None


def own_settings(run_dir: Path, wanted: dict) -> dict | None:
    """The settings of the run dir's own table; None while it has none (the first analysis becomes its own).
    A table analysed before settings were recorded is taken as the run's own, with its D' from the table and the
    rest as asked (before, every other analysis setting named another run dir)."""
    recorded = recorded_settings(run_dir)
    if recorded is not None or not (run_dir / TABLE).exists():
        return recorded
    table = pd.read_csv(run_dir / TABLE)
    dprime = str(table["dprime"].dropna().iloc[0]) if "dprime" in table and table["dprime"].notna().any() \
        else "heldout"
    return {**wanted, "dprime": dprime, **({} if "target" in table else LEGACY)}  # no target column: D' alone


def table_dir(cfg, run_dir: Path) -> Path:
    """The folder holding (or to hold) the G table of cfg's analysis settings for this run."""
    wanted = analysis_settings(cfg)
    own = own_settings(run_dir, wanted)
    return run_dir if own is None or own == wanted else run_dir / f"{PREFIX}{analysis_key(wanted)}"


def prepare(cfg, run_dir: Path) -> Path:
    """Create the folder for cfg's settings (links to the run's checkpoints, model and D' cache) and record the
    settings in it before its first row; returns it."""
    run_dir = Path(run_dir)
    wanted = analysis_settings(cfg)
    folder = table_dir(cfg, run_dir)
    if not (run_dir / SETTINGS).exists() and (folder == run_dir or (run_dir / TABLE).exists()):
        _write(run_dir / SETTINGS, own_settings(run_dir, wanted) or wanted)  # the own table's, once and for all
    if folder != run_dir:
        folder.mkdir(exist_ok=True)
        (run_dir / "analysis").mkdir(exist_ok=True)
        for name in LINKED:
            link = folder / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(Path("..") / name)  # relative: the run dir can be moved
        if not (folder / SETTINGS).exists():
            _write(folder / SETTINGS, wanted)
        log.info("analysis settings other than the run's own: G goes to %s", folder)
    return folder


def _write(path: Path, settings: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    tmp.replace(path)


def pending(cfg, run_dir: Path) -> bool:
    """Whether G with cfg's settings is missing at some checkpoint of the run (analysis enabled)."""
    if not cfg.analysis.enabled:
        return False
    table = table_dir(cfg, Path(run_dir)) / TABLE
    done = set(pd.read_csv(table)["step"].unique().tolist()) if table.exists() else set()
    return any(step not in done for step in step_dirs(Path(run_dir) / "checkpoints"))


def analyse(cfg, run_dir: Path, sft_dir: Path, wandb_run=None) -> Path | None:
    """G at every checkpoint of the run with cfg's analysis settings, in their folder (the run dir or
    `analysis_<key>/`); every rank calls it (the analysis may be sharded). Returns the table's path."""
    from .stage import run_alignment

    if not cfg.analysis.enabled:
        return None
    folder = Path(distributed.main_first(lambda: str(prepare(cfg, Path(run_dir)))))
    return run_alignment(cfg, folder, sft_dir, wandb_run)
