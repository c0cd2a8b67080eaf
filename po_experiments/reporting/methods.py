"""What a run is, in the paper's words: its method label (Table 1's rows) and the Fig. 4 panel it belongs to.

Written into summary.json by the pipeline, so aggregation reads the output contract and nothing else.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from ..objectives import OBJECTIVES

PARAMS = ("t1", "t2", "lam", "t3", "tau")  # the parameters that make the method: always in its label
SCHEDULE = PARAMS  # what a controller's lambda replaces (cDPO's t1/t2, cPPO's lam, hPPO's t3/tau): not in its label
NOT_PARAMS = ("name", "family", "components")  # what the label says otherwise (name, [components])
# Fig. 4: (panel, title, family whose plain run is the baseline, the variant drawn against it)
PANELS = (
    ("a", "DPO w/o NEG / w/o POS", "dpo", "ablation"),
    ("b", "PPO w/o TOP / w/o MID", "ppo", "ablation"),
    ("c", "cDPO", "dpo", "cdpo"),
    ("d", "cPPO (top)", "ppo", "cppo"),
    ("e", "cPPO (middle)", "ppo", "cppo_mid"),
    ("f", "hPPO", "ppo", "hppo"),
)


def algo_defaults(algo) -> dict:
    """The schema defaults of the objective's parameters (from the registry; {} for one no longer registered)."""
    spec = OBJECTIVES.get(algo.get("name"))
    return spec.defaults() if spec else {}


def label_of(name: str) -> str:
    spec = OBJECTIVES.get(name)
    return spec.label if spec else name


def table1_row(name: str, variant: str) -> str | None:
    """The Table 1 row a run competes in: its objective's (cPPO-top and -mid share one), none for ablations."""
    spec = OBJECTIVES.get(name)
    return spec.table1_row if spec and variant not in ("ablation", "no_sft") else None


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def controller_tag(cfg) -> str:
    """The run's controller as its label says it: its name and every setting off its schema default, e.g.
    "g_balance" or "g_balance every=5"; "none" without one."""
    import dataclasses

    from ..config import ControllerConfig

    c = OmegaConf.select(cfg, "controller")
    if c is None or c.get("name", "none") == "none":
        return "none"
    off = [f"{f.name}={_value(c[f.name])}" for f in dataclasses.fields(ControllerConfig)
           if f.name != "name" and f.name in c and c[f.name] != f.default]
    return " ".join([c.name, *off])


def describe(cfg) -> dict:
    """{method, family, variant, algo_params} of a run's config. The label names the method's own parameters
    (t1, t2, lam, t3, tau) and every other algorithm parameter that differs from its schema default, e.g.
    "DPO (beta=0.2)", so runs of a sweep over any of them are rows of their own in Table 1; `algo_params` holds
    every parameter."""
    algo = cfg.algo
    controller = controller_tag(cfg)
    controlled = controller != "none"  # its lambda replaces t1/t2: they are no part of the method
    every = {k: algo[k] for k in algo if k not in NOT_PARAMS and algo[k] is not None
             and not (controlled and k in SCHEDULE)}
    defaults = algo_defaults(algo)
    shown = {k: v for k, v in every.items() if k in PARAMS or k not in defaults or v != defaults[k]}
    params = dict(sorted(every.items(), key=lambda kv: (kv[0] not in PARAMS, PARAMS.index(kv[0])
                                                          if kv[0] in PARAMS else kv[0])))
    label = label_of(algo.name)
    if shown or controlled:  # "cDPO (g_balance)": a controller run is a method of its own
        label += " (" + ", ".join([controller] * controlled + [f"{k}={_value(v)}" for k, v in params.items()
                                                               if k in shown]) + ")"
    components = list(OmegaConf.to_container(algo.components)) if "components" in algo else ["TOT"]
    if components != ["TOT"]:
        label += " [" + "+".join(components) + "]"
    variant = "baseline" if algo.name == algo.family and components == ["TOT"] else algo.name
    spec = OBJECTIVES.get(algo.name)
    if algo.get("t1") is not None and spec is not None and not spec.schedules_itself:
        variant = f"{algo.name}_controlled"  # the generic controlled schedule: a case of its own, not the objective
    if controlled:
        variant = f"{algo.name}_{cfg.controller.name}"  # no Table 1 row: not one of the paper's methods
    if cfg.ablation.name != "none":
        ab = cfg.ablation
        window = ""
        if ab.get("start_step") or ab.get("stop_step") is not None:
            window = f" (steps {ab.start_step}-{'end' if ab.stop_step is None else ab.stop_step})"
        label += " w/o " + "+".join(ab.drop) + window
        variant = "ablation"
    if not OmegaConf.select(cfg, "sft.enabled", default=True):  # Fig. 8: from the base model, win rate vs it
        label += " [no SFT, vs base]"
        variant = "no_sft"
    return {"method": label, "family": algo.family, "variant": variant,
            "algo_params": OmegaConf.to_container(OmegaConf.create(params)) if params else {}}
