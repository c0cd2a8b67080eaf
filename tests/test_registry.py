"""The registry is the whole extension point: an objective registered here (one function, its schema and one
YAML) composes, validates, is labelled, gets its Table 1 row and its G components, with no other file touched;
and every registered objective has its YAML, and every YAML its objective."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from po_experiments.config import register_configs, validate
from po_experiments.errors import ConfigError
from po_experiments.objectives import OBJECTIVES, components_of, register_objective
from po_experiments.objectives.pairwise import Decomposition, PairTerms, PairwiseConfig, build_pair_terms
from po_experiments.analysis.gradients import dpo_coefficients
from po_experiments.reporting.aggregate import row_of
from po_experiments.reporting.methods import describe

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class MarginConfig(PairwiseConfig):
    name: str = "margin_dpo"
    margin: float = 0.5  # a new hyper-parameter

    @staticmethod
    def problems(a):
        return PairwiseConfig.problems(a) + ([("margin", f"must be >= 0, got {a.margin}")] if a.margin < 0 else [])


def margin_dpo(t: PairTerms, algo) -> Decomposition:
    """DPO with a margin inside the sigmoid and an NLL anchor on y+: a new objective with its own term."""
    z = algo.beta * ((t.chosen - t.ref_chosen) - (t.rejected - t.ref_rejected)) - algo.margin
    omega = (algo.beta * torch.sigmoid(-z)).detach()
    nll = (0.1 / t.chosen_len).detach()
    loss = -torch.nn.functional.logsigmoid(z) - 0.1 * t.chosen / t.chosen_len
    return Decomposition(loss, omega, omega, extras={"ANCHOR": (nll, torch.zeros_like(nll))})


@pytest.fixture
def new_objective(tmp_path):
    register_objective("margin_dpo", family="dpo", schema=MarginConfig, label="MarginDPO",
                       extra_components=("ANCHOR",))(margin_dpo)
    register_configs()  # what importing po_experiments.config does for the objectives registered at import
    conf = tmp_path / "conf"
    (conf / "algo").mkdir(parents=True)
    (conf / "algo" / "margin_dpo.yaml").write_text(  # a per-model case, read from the model config when it has one
        "defaults: [margin_dpo_schema, _self_]\nname: margin_dpo\nmargin: ${oc.select:model.cases.margin_dpo.margin,0.5}\n")
    yield conf
    del OBJECTIVES["margin_dpo"]


def compose_with(conf: Path, overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.cache_dir=/tmp/y",
                                            f"hydra.searchpath=[file://{conf}]", *overrides])


def test_a_new_objective_is_one_function_and_one_yaml(new_objective):
    cfg = compose_with(new_objective, ["algo=margin_dpo", "algo.margin=0.2", "algo.components=[TOT]"])
    validate(cfg)
    assert cfg.algo.margin == 0.2 and cfg.algo.family == "dpo"
    assert describe(cfg)["method"] == "MarginDPO (margin=0.2)"
    assert row_of("dpo", describe(cfg)["variant"]) == "MarginDPO"
    assert components_of(cfg.algo) == ("TOT", "POS", "NEG", "TOP", "MID", "BOT", "ANCHOR")
    assert compose_with(new_objective, ["algo=margin_dpo"]).algo.margin == 0.5  # no case for this model
    per_model = compose_with(new_objective, ["algo=margin_dpo", "+model.cases={margin_dpo: {margin: 0.3}}"])
    assert per_model.algo.margin == 0.3  # what conf/model/<model>.yaml's `cases:` would set
    with pytest.raises(ConfigError, match=r"algo\.margin: must be >= 0"):
        validate(compose_with(new_objective, ["algo=margin_dpo", "algo.margin=-1"]))
    with pytest.raises(Exception, match="mrgin"):  # a typo fails at composition, against the schema
        compose_with(new_objective, ["algo=margin_dpo", "algo.mrgin=1"])
    # the G analysis measures its own term, and the parts add up to the whole
    g = torch.Generator().manual_seed(0)
    lp = [torch.randn(9, generator=g, dtype=torch.float64) - 5 for _ in range(4)]
    comp = torch.ones(9, 6)
    coef = dpo_coefficients(*lp, cfg.algo, 0, chosen_completion=comp, rejected_completion=comp)
    assert set(coef) == set(components_of(cfg.algo))
    assert torch.allclose(coef["POS"] + coef["NEG"] + coef["ANCHOR"], coef["TOT"], rtol=0, atol=1e-15)
    assert torch.allclose(coef["TOP"] + coef["MID"] + coef["BOT"] + coef["ANCHOR"], coef["TOT"], rtol=0, atol=1e-15)
    # and its surrogate has its loss's gradient
    t = build_pair_terms(lp[0].clone().requires_grad_(True), lp[1].clone().requires_grad_(True), lp[2], lp[3],
                         chosen_completion=comp, rejected_completion=comp)
    d = margin_dpo(t, cfg.algo)
    grads = torch.autograd.grad(d.loss.sum(), [t.chosen, t.rejected])
    assert torch.allclose(torch.cat(grads), coef["TOT"], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_has_its_yaml_and_composes(name):
    assert (CONF / "algo" / f"{name}.yaml").exists(), f"conf/algo/{name}.yaml is missing"
    spec = OBJECTIVES[name]
    cfg = compose_with(CONF, [f"algo={name}"])
    assert cfg.algo.name == name and cfg.algo.family == spec.family
    assert OmegaConf.get_type(cfg.algo) is spec.schema
    assert describe(cfg)["method"].startswith(spec.label)


def test_every_algo_yaml_names_a_registered_objective():
    for path in (CONF / "algo").glob("*.yaml"):
        assert path.stem in OBJECTIVES, f"{path} has no registered objective"
