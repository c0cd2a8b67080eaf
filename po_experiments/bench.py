"""What the benchmark scripts in `scripts/` share: summary statistics, writing results, the CLI's exit."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def quartiles(xs) -> tuple[float, float, float]:
    """(Q1, median, Q3) of a sample of timings."""
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return float(q1), float(med), float(q3)


def write_results(res: dict, path: str, header: list[str], rows: list[list]) -> None:
    """`rows` under `header` as CSV when `path` ends in .csv, else the whole result as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    else:
        path.write_text(json.dumps(res, indent=2, default=str))


def cli(run, parse_args, print_table, write_out, argv=None) -> int:
    """Measure, print, optionally write; a measurement, not a test: the verdict is printed, never the exit code."""
    res = run(parse_args(argv))
    print_table(res)
    if res["config"]["out"]:
        write_out(res, res["config"]["out"])
    return 0
