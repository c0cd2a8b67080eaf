"""Run (or continue) the gradient-alignment analysis on an existing run dir, with its own resolved config.

    python scripts/analyse_run.py outputs/default/runs/default
    python scripts/analyse_run.py outputs/default/runs/default analysis.dprime=train analysis.n_pairs=200

Overrides use Hydra's key=value syntax on the run's `.hydra/config.yaml`. Checkpoints already in
`alignment.csv` are skipped; the D' answers of the final model are cached under `analysis/`. An
`analysis.dprime` other than the run's own writes into `<run dir>/analysis_<dprime>/`, beside the main table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from po_experiments.analysis.stage import run_alignment  # noqa: E402
from po_experiments.config import run_config  # noqa: E402
from po_experiments.models import set_threads  # noqa: E402
from po_experiments.stages.sft import sft_model_dir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides (e.g. analysis.dprime=train)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_dir = args.run_dir.resolve()
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg = run_config(run_dir, args.overrides)
    if not (run_dir / "model" / "DONE").exists():
        parser.error(f"{run_dir} has no finished model/ (train it first with run.py)")
    set_threads(cfg.runtime.threads)
    variant = cfg.analysis.dprime != saved.get("analysis", {}).get("dprime", "heldout")
    target = run_dir / f"analysis_{cfg.analysis.dprime}" if variant else run_dir
    if variant:  # keep another D' variant (e.g. Fig. 7b's in-distribution one) apart from the run's own table
        target.mkdir(exist_ok=True)
        for name in ("checkpoints", "model"):
            link = target / name
            if not link.exists():
                link.symlink_to(run_dir / name)
    table = run_alignment(cfg, target, sft_model_dir(cfg))
    print(f"wrote {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
