"""Every preference-optimisation objective, registered once: the whole extension point.

An objective is one function plus its config schema, declared with `@register_objective`. From the registry
come: Hydra's `algo/<name>_schema` node (so `conf/algo/<name>.yaml` composes against it and a typo fails at
composition), the range checks (`schema.problems`), the run label and Table 1 row (reporting.methods), the
components the trainer masks and the G analysis measures, and the suite's invariant tests, which are
parametrised over `OBJECTIVES`.

Two families, one weight contract each:
- pairwise (`family="dpo"`): f(PairTerms, algo) -> Decomposition, detached signed weights (w+, w-) on
  log pi(y+), log pi(y-) per pair, plus any term that is neither side (an NLL anchor) as its own component;
- policy gradient (`family="ppo"`): an advantage estimator (GAE, group-normalised, leave-one-out, ...) whose
  per-token advantages a registered weighting (plain, cPPO, hPPO) multiplies; the loss is the clipped surrogate.

Adding an objective: a function in `pairwise_losses.py` (or an estimator in `policy_gradient.py`), a schema
dataclass next to it when it has parameters of its own, and `conf/algo/<name>.yaml`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

FAMILIES = ("dpo", "ppo")  # pairwise (offline pairs), policy gradient (online rollouts)


@dataclass(frozen=True)
class Objective:
    name: str
    family: str  # "dpo": pairwise; "ppo": policy gradient
    fn: Callable  # pairwise: (PairTerms, algo) -> Decomposition; policy gradient: the advantage estimator
    schema: type  # the algo section's dataclass (defaults, types; `problems(algo)` for ranges)
    label: str  # "DPO", "SimPO", "cPPO-top": how figures and tables name it
    table1_row: str  # the Table 1 row it competes in (cPPO-top and cPPO-mid are both "cPPO")
    extra_components: tuple[str, ...] = ()  # terms that are neither side nor sign (NLL anchor, KL): own components
    schedules_itself: bool = False  # pairwise: t1/t2 are its own (cDPO, Eq. 32), not the generic controlled schedule

    def defaults(self) -> dict:
        return {f.name: f.default for f in dataclasses.fields(self.schema)
                if f.default is not dataclasses.MISSING}


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, family: str, schema: type, label: str | None = None,
                       table1_row: str | None = None, extra_components: tuple[str, ...] = (),
                       schedules_itself: bool = False):
    """Decorator registering `fn` as objective `name` (see the module docstring for what derives from it)."""
    if family not in FAMILIES:
        raise ValueError(f"objective {name!r}: family must be one of {FAMILIES}, got {family!r}")

    def wrap(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = Objective(name, family, fn, schema, label or name, table1_row or label or name,
                                     tuple(extra_components), schedules_itself)
        return fn
    return wrap


def objective_of(algo) -> Objective:
    """The registered objective of an `algo` config section (KeyError listing the registered ones)."""
    name = algo.name if hasattr(algo, "name") else algo["name"]
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def components_of(algo) -> tuple[str, ...]:
    """Every component of an objective the G analysis measures: TOT, POS, NEG, TOP, MID, BOT and its own terms."""
    return BASE_COMPONENTS + objective_of(algo).extra_components


BASE_COMPONENTS = ("TOT", "POS", "NEG", "TOP", "MID", "BOT")

from . import pairwise_losses, policy_gradient  # noqa: E402,F401  (registers the objectives)
