"""Entry point: `python run.py [group=option ...] [key=value ...]` (Hydra). See README.md."""
import sys

import hydra
from omegaconf import DictConfig

import po_experiments.config  # noqa: F401  (registers the config schemas and resolvers)
from po_experiments.errors import PoError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from po_experiments.config import validate
    from po_experiments.pipeline import run

    try:
        validate(cfg)
        return run(cfg).get("win_rate")
    except PoError as err:  # a problem the user can fix: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
