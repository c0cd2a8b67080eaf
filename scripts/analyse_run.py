"""Run (or continue) the gradient-alignment analysis on an existing run dir, with its own resolved config.

    python scripts/analyse_run.py outputs/default/runs/default
    python scripts/analyse_run.py outputs/default/runs/default analysis.dprime=train analysis.n_pairs=200

Overrides use Hydra's key=value syntax on the run's `.hydra/config.yaml`, whose analysis section is the run's
own (`alignment_settings.json`: the last command that asked for the run may have had others). It does what
`run.py` does for a finished run asked for G (pipeline.analyse_finished): G with the run's own analysis settings
goes to its `alignment.csv`, with any other settings (another D', sample or batch size, dtype) to
`<run dir>/analysis_<key>/` (`analysis.variants`), each folder skipping only the checkpoints it has analysed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from po_experiments.analysis import variants  # noqa: E402
from po_experiments.config import run_config  # noqa: E402
from po_experiments.models import set_threads  # noqa: E402
from po_experiments.pipeline import analyse_finished  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides (e.g. analysis.dprime=train)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_dir = args.run_dir.resolve()
    if not (run_dir / "model" / "DONE").exists() or not (run_dir / "summary.json").exists():
        parser.error(f"{run_dir} is not a finished run (no model/DONE or summary.json): train it first with run.py")
    own = variants.recorded_settings(run_dir) or {}  # the run's own analysis settings, then the overrides
    cfg = run_config(run_dir, [*(f"analysis.{k}={json.dumps(v)}" for k, v in own.items()), "analysis.enabled=true",
                               *args.overrides])  # a run trained without G gets it here
    set_threads(cfg.runtime.threads)
    analyse_finished(cfg, run_dir, json.loads((run_dir / "summary.json").read_text()))
    print(f"wrote {variants.table_dir(cfg, run_dir) / variants.TABLE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
