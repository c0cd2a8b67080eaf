"""Entry point: `python run.py [group=option ...] [key=value ...]` (Hydra). See README.md."""
import sys

import hydra
from omegaconf import DictConfig

import po_experiments.config  # noqa: F401  (registers the config schemas and resolvers)
from po_experiments.errors import PoError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from po_experiments import plan
    from po_experiments.config import validate
    from po_experiments.pipeline import preflight, run

    try:
        validate(cfg)
        cfg = plan.resolve_deepspeed(cfg)  # deepspeed=auto: the least sharding that fits
        if not cfg.dry_run:
            preflight(cfg)  # models, reward models and judges can be had here (seconds): before the plan's verdict
        the_plan = plan.check(cfg)  # a run whose plan does not fit stops here
        if cfg.dry_run:
            return dry_run(cfg, the_plan)
        return run(cfg).get("win_rate")
    except PoError as err:  # a problem the user can fix: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


def dry_run(cfg, the_plan: dict):
    """Print the plan, write plan.json in the run dir, exit 0 when every stage fits, else 2 naming the stages."""
    from pathlib import Path

    from po_experiments import plan

    print(plan.format_plan(the_plan))
    path = plan.write_plan(the_plan, Path(cfg.paths.output_dir))
    print(f"plan written to {path}")
    problems = plan.not_fitting(the_plan)
    if problems:
        print("does not fit:\n  " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(2)
    return None


if __name__ == "__main__":
    main()
