"""What a run is, in the paper's words: its method label (Table 1's rows) and the Fig. 4 panel it belongs to.

Written into summary.json by the pipeline, so aggregation reads the output contract and nothing else.
"""
from __future__ import annotations

from omegaconf import OmegaConf

LABELS = {"dpo": "DPO", "cdpo": "cDPO", "ppo": "PPO", "cppo": "cPPO-top", "cppo_mid": "cPPO-mid", "hppo": "hPPO"}
PARAMS = ("t1", "t2", "lam", "t3", "tau")
# Fig. 4: (panel, title, family whose plain run is the baseline, the variant drawn against it)
PANELS = (
    ("a", "DPO w/o NEG / w/o POS", "dpo", "ablation"),
    ("b", "PPO w/o TOP / w/o MID", "ppo", "ablation"),
    ("c", "cDPO", "dpo", "cdpo"),
    ("d", "cPPO (top)", "ppo", "cppo"),
    ("e", "cPPO (middle)", "ppo", "cppo_mid"),
    ("f", "hPPO", "ppo", "hppo"),
)


def describe(cfg) -> dict:
    """{method, family, variant, algo_params} of a run's config."""
    algo = cfg.algo
    params = {k: algo[k] for k in PARAMS if k in algo and algo[k] is not None}
    label = LABELS.get(algo.name, algo.name)
    if params:
        label += " (" + ", ".join(f"{k}={v:g}" for k, v in params.items()) + ")"
    components = list(OmegaConf.to_container(algo.components)) if "components" in algo else ["TOT"]
    if components != ["TOT"]:
        label += " [" + "+".join(components) + "]"
    variant = "baseline" if algo.name == algo.family and components == ["TOT"] else algo.name
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
    return {"method": label, "family": algo.family, "variant": variant, "algo_params": params}
