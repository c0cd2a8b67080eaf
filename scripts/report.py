"""The sweep report: one static HTML page (always), and a W&B report when online.

    python scripts/report.py outputs/seeds                      # -> outputs/seeds/report/index.html
    python scripts/report.py outputs/seeds --check --screenshot report.png   # open it in headless chromium
    python scripts/report.py outputs/seeds --wandb --project po-experiments --group seeds   # online

The HTML folder is self-contained (relative image paths): copy it off an air-gapped cluster and open it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from po_experiments.reporting.html import build_report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a folder holding run dirs, e.g. outputs/<name>")
    parser.add_argument("--out", type=Path, help="where to write (default: <root>/report)")
    parser.add_argument("--title")
    parser.add_argument("--samples", type=int, default=5, help="outputs with verdicts shown per run")
    parser.add_argument("--check", action="store_true", help="open the page in headless chromium, count images")
    parser.add_argument("--screenshot", type=Path, help="with --check: save a PNG of the page")
    parser.add_argument("--wandb", action="store_true", help="also build a W&B report (needs the network)")
    parser.add_argument("--project", default="po-experiments")
    parser.add_argument("--entity")
    parser.add_argument("--group", help="W&B group = the experiment name (default: the root folder's name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    page = build_report(args.root, args.out or args.root / "report", title=args.title, n_samples=args.samples)
    print(f"wrote {page}")
    status = 0
    if args.check:
        from po_experiments.reporting.browser import open_page

        seen = open_page(page, args.screenshot)
        print(f"chromium: {seen['loaded']}/{seen['total']} images loaded")
        status = 0 if seen["loaded"] == seen["total"] else 1
    if args.wandb:
        from po_experiments.reporting.wandb_report import build_wandb_report

        print("W&B report:", build_wandb_report(project=args.project, entity=args.entity,
                                                group=args.group or args.root.resolve().name, title=args.title))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
