"""Closed-loop controllers of an objective's balance lambda (the `controller` config group; paper Sec. 5.2).

The paper's "coordinated preference optimization" envisions a training pipeline and a second one that measures
each component's real-time effect and adjusts the components' roles from it. A controller here is that loop in
one process: every few steps it measures G of components on a proxy target available during training and sets
the objective's lambda (cDPO's balance of positive and negative learning, Eq. 32, or the controlled schedule's on
any pairwise objective). `none` is today's behaviour (the objective's own t1/t2 schedule, nothing measured).

A controller is a class registered with `@register_controller(name)`, built by `build_controller(cfg, ...)`, plus
`conf/controller/<name>.yaml` (schema: config.ControllerConfig).
"""
from __future__ import annotations

from ..objectives import objective_of

CONTROLLERS: dict[str, type] = {}


def register_controller(name: str):
    def wrap(cls):
        if name in CONTROLLERS:
            raise ValueError(f"controller {name!r} is registered twice")
        CONTROLLERS[name] = cls
        return cls
    return wrap


def active(cfg) -> bool:
    """Whether the run has a controller (a config saved before the group existed has none)."""
    c = cfg.get("controller")
    return c is not None and c.get("name", "none") != "none"


def controllable(algo) -> str | None:
    """Why a controller cannot set this objective's lambda, or None when it can: cDPO (its lambda is Eq. 32's) or a
    pairwise objective under the controlled schedule (algo.t1/t2 set: (1 - lambda) w+ and lambda w-)."""
    from ..objectives.policy_gradient import CONTROLLED

    spec = objective_of(algo)
    if spec.family != "dpo":
        if algo.get("weighting") in CONTROLLED:
            return None
        return (f"objective {spec.name!r} (weighting {algo.get('weighting')!r}) has no lambda to set: use a "
                f"weighting with one ({', '.join(CONTROLLED)}: algo=hppo, cppo, cppo_mid) or algo=cdpo")
    if spec.schedules_itself or algo.get("t1") is not None:
        return None
    return (f"objective {spec.name!r} has no lambda to set: use algo=cdpo, or put it under the controlled "
            f"schedule (algo.t1=... algo.t2=..., whose lambda the controller then replaces)")


def measured(algo) -> tuple[str, str]:
    """(the component whose weight lambda is, the rest it is compared with): cDPO and the controlled schedule:
    (NEG, POS); hPPO: (NEG, POS); cPPO-top / -mid: (TOP / MID, REST = every other token)."""
    from ..objectives.policy_gradient import CONTROLLED

    if objective_of(algo).family == "dpo" or CONTROLLED[algo.weighting] == "NEG":
        return "NEG", "POS"
    return CONTROLLED[algo.weighting], "REST"


def build_controller(cfg, tokenizer, run_dir):
    """The run's controller (None for controller=none)."""
    if not active(cfg):
        return None
    return CONTROLLERS[cfg.controller.name](cfg, tokenizer, run_dir)


from . import g_balance  # noqa: F401  (registers it)

__all__ = ["CONTROLLERS", "active", "build_controller", "controllable", "measured", "register_controller"]
