"""Aggregate a sweep's runs into Table 1 (CSV, Markdown, PNG), the Fig. 4 win-rate panels, the paper's figures and
the objectives' comparison.

    python scripts/aggregate.py outputs/paper                 # every run under it (runs/ and multirun/)
    python scripts/aggregate.py outputs/paper_fast --figures fig1,fig12   # only these paper figures
    python scripts/aggregate.py outputs/seeds --out tables/
    python scripts/aggregate.py --list                        # the paper figures it knows

Reads only each run's summary.json, win_rate.csv, alignment tables and log history. Writes into <root>/aggregate:
table1.* (each row's best case, beside the paper's), cases.csv, curves.csv, fig4_<model>_<judge>.png
(aggregate.py) and, for every paper figure the runs can feed,
<fig>_<model>.png + .csv (G figures) or <fig>_<model>_<judge>.png + .csv (win-rate figures), see
po_experiments/reporting/paper_figures.py; and, where runs of `experiment=objectives` have G tables, objectives.*
(final win rate and final G of TOT / POS / NEG / extras per objective) and objectives_G_<model>.png + .csv
(po_experiments/reporting/objectives.py). The presets in conf/experiment/ produce the runs of each figure.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from po_experiments.reporting.aggregate import aggregate  # noqa: E402
from po_experiments.reporting.objectives import draw_objectives  # noqa: E402
from po_experiments.reporting.paper_figures import FIGURES, describe_figures, draw_paper_figures  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, nargs="?", help="a folder holding run dirs, e.g. outputs/<name>")
    parser.add_argument("--out", type=Path, help="where to write (default: <root>/aggregate)")
    parser.add_argument("--figures", help="comma-separated paper figures to draw (default: all the runs can feed)")
    parser.add_argument("--list", action="store_true", help="list the paper figures and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(describe_figures())
        print("objectives  every objective: final win rate and G (table), G over training (figure) [any model]")
        return 0
    if args.root is None:
        parser.error("root is required")
    only = args.figures.split(",") if args.figures else None
    unknown = sorted(set(only or ()) - set(FIGURES) - {"table1", "objectives"})
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; known: table1, objectives, {', '.join(FIGURES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = args.out or args.root / "aggregate"
    written = aggregate(args.root, out)
    print(written["table1.md"].read_text())
    written.update(draw_paper_figures(args.root, out, only))
    if only is None or "objectives" in only:
        written.update(draw_objectives(args.root, out))
        if "objectives.md" in written:
            print(written["objectives.md"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
