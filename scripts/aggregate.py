"""Aggregate a sweep's runs into Table 1 (CSV, Markdown, PNG) and the Fig. 4 win-rate panels.

    python scripts/aggregate.py outputs/seeds                 # every run under it (runs/ and multirun/)
    python scripts/aggregate.py outputs/seeds --out tables/

Reads only each run's summary.json and win_rate.csv.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from po_experiments.reporting.aggregate import aggregate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a folder holding run dirs, e.g. outputs/<name>")
    parser.add_argument("--out", type=Path, help="where to write (default: <root>/aggregate)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    written = aggregate(args.root, args.out or args.root / "aggregate")
    print(written["table1.md"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
