"""Judge a finished run dir's outputs with another judge, at every checkpoint, generating nothing again.

    python scripts/evaluate_run.py outputs/default/runs/default eval.judge=reward_model eval.reward_model.path=RM
    python scripts/evaluate_run.py outputs/paper/runs/<run> eval.judge=alpaca_eval \\
        eval.alpaca_eval.annotator=local eval.alpaca_eval.local_model=/models/Llama-3-70B-Instruct

The greedy outputs cached under `<run dir>/eval/outputs/` are judged (missing ones are generated first); the
verdicts go to `eval/<judge>/step-<N>.json` and the rows to `win_rate.csv` beside the other judges' rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from po_experiments.config import run_config  # noqa: E402
from po_experiments.errors import PoError  # noqa: E402
from po_experiments.pipeline import finished_run  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides (e.g. eval.judge=reward_model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_dir = args.run_dir.resolve()
    if not (run_dir / "summary.json").exists():
        parser.error(f"{run_dir} has no summary.json (finish the run with run.py first)")
    try:
        summary = finished_run(run_config(run_dir, args.overrides), run_dir,
                               json.loads((run_dir / "summary.json").read_text()))
    except PoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary.get("win_rates", {}), indent=1))
    print((run_dir / "win_rate.csv").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
