"""The paper's claims as a tracked table (reporting/claims.py, experiment=claims): every rule on synthetic run dirs
built to make each claim hold and built to break it, "not measurable" where runs are missing, the output contract
(deterministic claims.csv / claims.md, the aggregate and HTML hooks) and the preset."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from test_experiments import CONF, REPO, _compose, fake_run, header, sweep_points

from po_experiments.reporting import claims as cl

STEPS = tuple(range(10, 100, 10))  # 9 checkpoints: thirds of 3
ROLES = {  # role -> (family, method label, variant, experiment/method)
    "dpo": ("dpo", "DPO", "baseline", "dpo"),
    "ppo": ("ppo", "PPO", "baseline", "ppo"),
    "ppo_wo_top": ("ppo", "PPO w/o TOP", "ablation", "ppo_wo_top"),
    "ppo_wo_mid": ("ppo", "PPO w/o MID", "ablation", "ppo_wo_mid"),
    "dpo_wo_neg": ("dpo", "DPO w/o NEG (steps 0-36)", "ablation", "dpo_wo_neg_early"),
    "dpo_wo_pos": ("dpo", "DPO w/o POS (steps 72-end)", "ablation", "dpo_wo_pos_late"),
}


def claims_run(root, role: str, seed: int, *, g=None, unfiltered: float = 1.0, norms=(1.0, 1.0),
               win: float = 50.0, adv=(0.0, 0.0), increased=(), targets=False):
    """A finished run dir (test_experiments.fake_run's, its tables replaced). `g(component, i)`: G at the i-th of
    STEPS; G_unfiltered = unfiltered x G; `norms`: POS / NEG gradient norms; `adv`: logged advantage of TOP / MID;
    `increased`: steps whose next update raised L (App. A); `targets`: a `target` column, with rows of another
    target that must be ignored."""
    family, label, variant, method = ROLES[role]
    run = fake_run(root, "tiny", family, seed, method=label, variant=variant,
                   overrides=[f"experiment/method={method}", "experiment/model=tiny", f"seed={seed}"])
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "final_step": STEPS[-1], "judge": "gold", "win_rate": win,
                                                  "win_rate_se": 1.0}))
    g = g or (lambda c, i: 1.0)
    rows = []
    for i, step in enumerate(STEPS):
        for c in cl.COMPONENTS:
            value = g(c, i)
            norm = {"POS": norms[0], "NEG": norms[1]}.get(c, 1.0)
            for target, v in (("dprime", value), *((("y_plus", -1e6),) if targets else ())):
                rows.append({"step": step, "component": c, "layer_group": "all", "G": v,
                             "G_unfiltered": unfiltered * v, "n_batches": 12, "n_outliers": 1 if unfiltered != 1
                             else 0, "grad_norm": norm, "loss": 0.5, "loss_before": 0.5,
                             "loss_after": 0.6 if step in increased else 0.4, "loss_increased": step in increased,
                             "algo_family": family, "dprime": "heldout", **({"target": target} if targets else {})})
    pd.DataFrame(rows).to_csv(run / "alignment.csv", index=False)
    pd.DataFrame({"judge": "gold", "step": [STEPS[0], STEPS[-1]], "win_rate": [99.0, win], "win_rate_se": 1.0,
                  "n": 64}).to_csv(run / "win_rate.csv", index=False)
    history = [{"step": s, "adv/TOP": adv[0], "adv/MID": adv[1], "adv/BOT": 0.0} for s in STEPS]
    (run / "model" / "log_history.json").write_text(json.dumps(history if family == "ppo" else []))
    return run


def third(i: int) -> int:
    return 0 if i < 3 else 2 if i >= 6 else 1


# Every claim held: DPO's G positive, POS leads early and NEG late, TOP not always first, POS / NEG norms of one
# order, filtering changes DPO's G (x2) but not PPO's; PPO's G slightly negative, POS > 0 > NEG, TOP < MID < 0 and
# BOT near 0, advantages TOP < 0 < MID; each ablation below its baseline, w/o TOP below w/o MID.
HELD_DPO = {"TOT": lambda i: 5.0, "POS": lambda i: (3.0, 2.0, 1.0)[third(i)],
            "NEG": lambda i: (1.0, 2.0, 3.0)[third(i)], "TOP": lambda i: 1.0, "MID": lambda i: 2.0,
            "BOT": lambda i: 0.0}
HELD_PPO = {"TOT": lambda i: -0.1, "POS": lambda i: 2.0, "NEG": lambda i: -1.0, "TOP": lambda i: -3.0,
            "MID": lambda i: -1.0, "BOT": lambda i: 0.05}
# Every claim broken: each value on the other side of its rule.
BROKEN_DPO = {"TOT": lambda i: -5.0, "POS": lambda i: (1.0, 2.0, 3.0)[third(i)],
              "NEG": lambda i: (3.0, 2.0, 1.0)[third(i)], "TOP": lambda i: 3.0, "MID": lambda i: 2.0,
              "BOT": lambda i: 1.0}
BROKEN_PPO = {"TOT": lambda i: 5.0, "POS": lambda i: -1.0, "NEG": lambda i: 1.0, "TOP": lambda i: 1.0,
              "MID": lambda i: -1.0, "BOT": lambda i: 10.0}


def pool(root, dpo, ppo, *, dpo_filter, ppo_filter, norms, adv, wins, seeds=(0, 1, 2)):
    for seed in seeds:
        claims_run(root, "dpo", seed, g=lambda c, i: dpo[c](i), unfiltered=dpo_filter, norms=norms, win=wins["dpo"])
        claims_run(root, "ppo", seed, g=lambda c, i: ppo[c](i), unfiltered=ppo_filter, adv=adv, win=wins["ppo"])
        for role in ("ppo_wo_top", "ppo_wo_mid", "dpo_wo_neg", "dpo_wo_pos"):
            claims_run(root, role, seed, win=wins[role] + seed)
    return root


@pytest.fixture
def held(tmp_path):
    wins = {"dpo": 60.0, "ppo": 60.0, "ppo_wo_top": 50.0, "ppo_wo_mid": 55.0, "dpo_wo_neg": 50.0, "dpo_wo_pos": 55.0}
    return pool(tmp_path / "held", HELD_DPO, HELD_PPO, dpo_filter=2.0, ppo_filter=1.0, norms=(2.0, 1.0),
                adv=(-0.5, 0.3), wins=wins)


@pytest.fixture
def broken(tmp_path):
    wins = {"dpo": 50.0, "ppo": 50.0, "ppo_wo_top": 58.0, "ppo_wo_mid": 55.0, "dpo_wo_neg": 55.0, "dpo_wo_pos": 58.0}
    return pool(tmp_path / "broken", BROKEN_DPO, BROKEN_PPO, dpo_filter=1.0, ppo_filter=2.0, norms=(100.0, 1.0),
                adv=(0.5, -0.3), wins=wins)


def verdicts(root, tmp_path) -> pd.DataFrame:
    written = cl.write_claims(root, tmp_path / "agg")
    return pd.read_csv(written["claims.csv"]).set_index("claim")


def test_every_claim_is_held_on_runs_built_to_hold_it(held, tmp_path):
    table = verdicts(held, tmp_path)
    assert list(table.index) == [c.id for c in cl.CLAIMS] and set(table["model"]) == {"tiny"}
    assert (table["verdict"] == cl.HELD).all(), table[table["verdict"] != cl.HELD][["verdict", "measured"]]
    measured = table["measured"]
    assert measured["dpo_g_positive"].startswith("G_TOT > 0 at 27/27 = 1 of (seed, checkpoint)")
    assert "median PPO G_TOT -0.1; median DPO |G_TOT| 5; ratio -0.02" in measured["ppo_g_near_zero"]
    assert measured["dpo_roles_exchange"] == "median over 3 seed(s) of mean(G_POS - G_NEG): early 2, late -2"
    assert "mean|G - G_unfiltered| / mean|G| (TOT): DPO 1, PPO 0" in measured["filtering_matters_more_for_dpo"]
    assert measured["ppo_wo_top_below_wo_mid"] == ("ppo_wo_top 51 ± 1 (n=3); ppo_wo_mid 56 ± 1 (n=3); "
                                                   "ppo_wo_top - ppo_wo_mid -5 (standard error 0.8165)")  # sqrt(2/3)
    assert table.at["ppo_wo_top_below_wo_mid", "judge"] == "gold" and pd.isna(table.at["dpo_g_positive", "judge"])


def test_every_claim_can_fail(broken, tmp_path):
    table = verdicts(broken, tmp_path)
    assert (table["verdict"] == cl.NOT_HELD).all(), table[table["verdict"] != cl.NOT_HELD][["verdict", "measured"]]
    assert table.at["dpo_norms_same_order", "measured"].startswith("|grad POS| / |grad NEG|: median 100")


def test_ppo_near_zero_is_relative_to_dpos_scale(tmp_path):
    """A PPO G of +0.4 is near zero beside a DPO |G| of 5 (<= 0.5) and not beside one of 3 (> 0.3)."""
    for scale, verdict in ((5.0, cl.HELD), (3.0, cl.NOT_HELD)):
        root = tmp_path / str(scale)
        claims_run(root, "dpo", 0, g=lambda c, i, scale=scale: scale)
        claims_run(root, "ppo", 0, g=lambda c, i: 0.4)
        assert verdicts(root, tmp_path / f"out{scale}").at["ppo_g_near_zero", "verdict"] == verdict


def test_not_measurable_names_the_missing_runs(tmp_path):
    root = tmp_path / "dpo_only"
    claims_run(root, "dpo", 0, g=lambda c, i: HELD_DPO[c](i), norms=(2.0, 1.0))
    table = verdicts(root, tmp_path)
    dpo_only = {"dpo_g_positive", "dpo_roles_exchange", "dpo_top_not_first", "dpo_norms_same_order"}
    assert set(table.index[table["verdict"] == cl.HELD]) == dpo_only
    rest = table.drop(index=sorted(dpo_only))
    assert (rest["verdict"] == cl.NOT_MEASURABLE).all()
    assert rest.at["ppo_g_near_zero", "measured"] == "missing: G:ppo"
    assert rest.at["ppo_wo_top_below_wo_mid", "measured"] == "missing: win:ppo_wo_top, win:ppo_wo_mid"
    assert rest.at["dpo_ablations_hurt", "measured"] == "missing: win:dpo_wo_neg, win:dpo_wo_pos"
    assert rest.at["ppo_advantages_top_negative", "measured"] == "missing: adv:ppo"
    assert cl.write_claims(tmp_path / "nothing", tmp_path / "none") == {}  # no run: nothing written


def test_a_single_checkpoint_cannot_tell_early_from_late(tmp_path):
    root = tmp_path / "one"
    run = claims_run(root, "dpo", 0, g=lambda c, i: HELD_DPO[c](i))
    table = pd.read_csv(run / "alignment.csv")
    table[table["step"] == STEPS[-1]].to_csv(run / "alignment.csv", index=False)
    row = verdicts(root, tmp_path).loc["dpo_roles_exchange"]
    assert row["verdict"] == cl.NOT_MEASURABLE and row["measured"] == "fewer than 2 checkpoints per run"


def test_g_is_read_against_the_papers_target_without_app_a_left_out_checkpoints(tmp_path):
    """Rows of another target (G against y+) never count; a checkpoint whose next update raised L is left out
    where the run has App. A's filter on (the default), as in the G figures."""
    root = tmp_path / "paper"
    claims_run(root, "dpo", 0, g=lambda c, i: -1.0 if i < 4 else 1.0, increased=STEPS[:4], targets=True)
    assert verdicts(root, tmp_path).at["dpo_g_positive", "measured"].startswith("G_TOT > 0 at 5/5 = 1")


def test_roles_other_methods_and_runs_without_sft_are_left_out():
    assert cl.role_of({"family": "dpo", "variant": "baseline", "method": "DPO"}) == "dpo"
    assert cl.role_of({"family": "ppo", "variant": "ablation", "method": "PPO w/o TOP"}) == "ppo_wo_top"
    assert cl.role_of({"family": "dpo", "variant": "ablation", "method": "DPO w/o NEG (steps 0-36)"}) == "dpo_wo_neg"
    assert cl.role_of({"family": "dpo", "variant": "baseline", "method": "DPO (beta=0.2)"}) is None
    assert cl.role_of({"family": "dpo", "variant": "cdpo", "method": "cDPO (t1=30, t2=80)"}) is None
    assert cl.role_of({"family": "dpo", "variant": "no_sft", "method": "DPO", "sft": False}) is None
    assert cl.role_of({"family": "ppo", "variant": "ablation", "method": "PPO w/o TOP+MID"}) is None


def test_output_is_deterministic_and_hooked_into_the_aggregate_and_the_report(held, tmp_path):
    from conftest import load_script

    from po_experiments.reporting.html import build_report

    first = cl.write_claims(held, tmp_path / "a")
    second = cl.write_claims(held, tmp_path / "b")
    for name in ("claims.csv", "claims.md"):
        assert first[name].read_bytes() == second[name].read_bytes()
    md = first["claims.md"].read_text()
    assert md.startswith("### The paper's claims (tiny)\n\n13 held, 0 not held, 0 not measurable of 13.")
    assert "| dpo_g_positive | Sec. 3.1, Fig. 1(a): \"G keeps positive" in md and "| **held** |" in md
    out = tmp_path / "agg"
    assert load_script("aggregate").main([str(held), "--out", str(out), "--figures", "table1"]) == 0
    assert (out / "claims.md").read_bytes() == first["claims.md"].read_bytes()
    page = build_report(held, tmp_path / "report").read_text()
    assert "The paper's claims: held" in page and "<td>ppo_wo_top_below_wo_mid</td>" in page


# ------------------------------------------------------------------------------------------ the preset

def test_the_preset_runs_the_claims_methods_on_the_tiny_model_in_its_own_pool():
    from po_experiments.config import validate

    points = sweep_points("claims", "full")
    methods = {p.split("=", 1)[1] for point in points for p in point if p.startswith("experiment/method=")}
    assert methods == {"dpo", "ppo", "ppo_wo_top", "ppo_wo_mid", "dpo_wo_neg_early", "dpo_wo_pos_late"}
    assert len(points) == 18 and len(sweep_points("claims", "fast")) == 6
    assert "= 18 runs (fast: 6 runs," in header("claims")
    for point in points[:: 3]:  # every method once (seeds vary last)
        cfg = _compose(["experiment=claims", *point, "paths.cache_dir=/nowhere"])
        cfg.paths.output_dir = "/nowhere"
        validate(cfg)
        assert (cfg.name, cfg.model.name, cfg.logger.name, cfg.analysis.enabled) == ("claims", "tiny", "none", True)
        assert (cfg.model.dpo.max_steps, cfg.model.dpo.save_steps, cfg.model.ppo.save_steps) == (108, 12, 4)
        method = next(p.split("=", 1)[1] for p in point if p.startswith("experiment/method="))
        drop = {"ppo_wo_top": ["TOP"], "ppo_wo_mid": ["MID"], "dpo_wo_neg_early": ["NEG"], "dpo_wo_pos_late": ["POS"]}
        assert list(cfg.ablation.get("drop") or []) == drop.get(method, [])
    fast = _compose(["experiment=claims", "mode=fast", *sweep_points("claims", "fast")[0]])
    assert (fast.name, fast.model.dpo.save_steps) == ("paper_fast", 36)  # mode=fast: the paper_fast pool's runs
    for method in methods:
        assert (CONF / "experiment" / "method" / f"{method}.yaml").exists()


@pytest.mark.slow  # SFT build + DPO and PPO of 108 / 32 steps with G at every checkpoint (~1-2 min on one core)
def test_the_preset_runs_end_to_end_and_the_aggregate_writes_its_claims(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PO_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, str(REPO / "run.py"), "-m", "experiment=claims", "experiment/method=dpo,ppo", "seed=0",
               "runtime.threads=1"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    root = tmp_path / "outputs" / "claims"
    assert len(list(root.glob("multirun/*/summary.json"))) == 2
    table = verdicts(root, tmp_path).reset_index()
    measured = table[table["verdict"] != cl.NOT_MEASURABLE]["claim"]
    assert {"dpo_g_positive", "ppo_g_near_zero", "dpo_roles_exchange", "filtering_matters_more_for_dpo"} <= \
        set(measured)
    assert set(table.set_index("claim").loc[list(measured), "verdict"]) <= {cl.HELD, cl.NOT_HELD}
