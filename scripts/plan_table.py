"""The dry-run plans of a sweep as one Markdown table: each job's run length, checkpoints and step settings.

    python run.py -m experiment=fig4 dry_run=true seed=0      # writes <run dir>/plan.json per sweep point
    python scripts/plan_table.py outputs/paper/multirun        # one row per plan.json found below the folder
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(root: Path) -> list[dict]:
    found = []
    for path in sorted(root.rglob("plan.json")):
        plan = json.loads(path.read_text())
        length = plan.get("run_length") or {}
        stage = plan["stages"].get(length.get("stage"), {})
        found.append({
            "run": path.parent.name, "model": plan["model"]["name"], "steps": length.get("steps"),
            "checkpoints": stage.get("checkpoints"), "unit": length.get("unit", ""),
            "settings": ", ".join(f"{s['key'].split('.')[-1]}={s['value']:g}{'' if s['inside'] else ' (OUTSIDE)'}"
                                  for s in length.get("settings", []) if not s["key"].endswith("save_steps")),
            "all_inside": all(s["inside"] for s in length.get("settings", [])),
        })
    return found


def markdown(found: list[dict]) -> str:
    lines = ["| run | model | steps | checkpoints | step settings | all inside |", "|---|---|---:|---:|---|---|"]
    lines += [f"| {r['run']} | {r['model']} | {r['steps']} | {r['checkpoints']} | {r['settings'] or '—'} | "
              f"{'yes' if r['all_inside'] else 'NO'} |" for r in found]
    units = sorted({r["unit"] for r in found if r["unit"]})
    return "\n".join(lines + [""] + [f"- step unit: {u}" for u in units])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a folder holding plan.json files (a dry-run sweep)")
    args = parser.parse_args(argv)
    found = rows(args.root)
    if not found:
        parser.error(f"no plan.json under {args.root} (run the sweep with dry_run=true first)")
    print(markdown(found))
    return 0 if all(r["all_inside"] for r in found) else 1


if __name__ == "__main__":
    raise SystemExit(main())
