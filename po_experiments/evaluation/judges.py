"""Judges behind one interface: `judge(pairs) -> verdicts`, chosen by `eval.judge`.

A pair is an AlpacaEval record: `instruction`, `output_1` / `generator_1` (the reference, the SFT model),
`output_2` / `generator_2` (the candidate), `dataset`, `index`, plus `prompt` (the text the models were fed).
A verdict is the same record with `preference` (1 reference wins, 2 candidate wins, 1.5 tie, or in between for a
weighted judge) and `annotator`, plus whatever the judge can show for itself (rewards, the judge LLM's answer).
A new judge is one `@register_judge` class here (or in its own module imported here) and its config keys.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..data.synthetic import DictionaryTask
from ..tasks import task_of
from ..errors import ConfigError
from ..registry import registry

log = logging.getLogger(__name__)
JUDGES, register_judge = registry("judge")


def short_name(path_or_id) -> str:
    """A model's name for files and tables: the last part of its hub id or folder."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(path_or_id).rstrip("/")).name)[:80]


def preference_from_scores(score_1: float, score_2: float) -> float:
    """AlpacaEval's encoding from two scalar scores: the higher one wins, equal scores tie."""
    return 2.0 if score_2 > score_1 else 1.0 if score_2 < score_1 else 1.5


@register_judge("gold")
class GoldJudge:
    """The embedded task's known reward: exact, free, and what the task was built to measure."""

    def __init__(self, cfg, workdir: Path):
        self.task = DictionaryTask.from_config(cfg.data)
        self.name = "gold"

    def judge(self, pairs: list[dict]) -> list[dict]:
        verdicts = []
        for p in pairs:
            r1, r2 = self.task.gold_reward(p["prompt"], p["output_1"]), self.task.gold_reward(p["prompt"], p["output_2"])
            verdicts.append({**p, "reward_1": r1, "reward_2": r2, "preference": preference_from_scores(r1, r2),
                             "annotator": self.name})
        return verdicts


@register_judge("reward_model")
class RewardModelJudge:
    """A sequence-classifier reward model scores both outputs; the higher score wins (ArmoRM, Skywork, ...).

    On real data the RM reads the instruction and the output through its own chat template; on the synthetic task
    it reads the prompt text and the output, as the learned reward model was trained."""

    def __init__(self, cfg, workdir: Path):
        from ..hub import resolve_pretrained
        from ..rewards import ClassifierReward

        rm = cfg.eval.reward_model
        source = resolve_pretrained(rm.path, "eval.reward_model.path",
                                    f"Point eval.reward_model.path at a local folder with config.json, the weights "
                                    f"and the tokenizer files of {Path(str(rm.path)).name}.")
        self.reward = ClassifierReward(source, trust_remote_code=rm.trust_remote_code, dtype=rm.dtype,
                                       batch_size=rm.batch_size, key="eval.reward_model.path")
        self.chat = task_of(cfg).chat
        self.name = base_judge_name(cfg, "reward_model")

    def judge(self, pairs: list[dict]) -> list[dict]:
        from ..rewards import synthetic_user_turn

        prompts = [p["prompt"] for p in pairs]
        # the user turn, for RMs with a chat template (ArmoRM, Skywork); RMs without one read prompt + output
        messages = [[{"role": "user", "content": p["instruction"]}] if self.chat else synthetic_user_turn(p["prompt"])
                    for p in pairs]
        r1 = self.reward.score(prompts, [p["output_1"] for p in pairs], messages).tolist()
        r2 = self.reward.score(prompts, [p["output_2"] for p in pairs], messages).tolist()
        return [{**p, "reward_1": a, "reward_2": b, "preference": preference_from_scores(a, b), "annotator": self.name}
                for p, a, b in zip(pairs, r1, r2)]


@register_judge("alpaca_eval")
class AlpacaEvalJudge:
    """An LLM judge through alpaca_eval's PairwiseAnnotator: its prompt, its random order of the two outputs per
    instruction, its parser, its annotation cache (`annotations.json`: a re-run asks the judge nothing twice)."""

    def __init__(self, cfg, workdir: Path):
        from .local_judge import annotator_config

        ae = cfg.eval.alpaca_eval
        self.length_controlled = ae.length_controlled
        config, extra, self.name = annotator_config(ae, workdir)
        from alpaca_eval.annotators import PairwiseAnnotator

        cache = workdir / self.name / "annotations.json"
        cache.parent.mkdir(parents=True, exist_ok=True)
        self.annotator = PairwiseAnnotator(annotators_config=config, caching_path=cache, seed=0, **extra)

    def judge(self, pairs: list[dict]) -> list[dict]:
        side = lambda i: [{"instruction": p["instruction"], "output": p[f"output_{i}"],  # noqa: E731
                           "generator": p[f"generator_{i}"]} for p in pairs]
        annotated = self.annotator.annotate_head2head(side(1), side(2), is_ordered=True)
        if len(annotated) != len(pairs):
            raise RuntimeError(f"alpaca_eval returned {len(annotated)} annotations for {len(pairs)} pairs")
        verdicts = []
        for p, a in zip(pairs, annotated):
            if (a["output_1"], a["output_2"]) != (p["output_1"], p["output_2"]):
                raise RuntimeError("alpaca_eval returned the annotations out of order")
            preference = a.get("preference")
            verdicts.append({**p, "preference": None if preference is None else float(preference),
                             "annotator": a.get("annotator", self.name),
                             "raw_completion": a.get("preference_raw_completion")})
        return verdicts


def requested_judge(cfg) -> str:
    return cfg.eval.judge.value if hasattr(cfg.eval.judge, "value") else str(cfg.eval.judge)


def resolve_judge(cfg) -> str:
    """`eval.judge`, with auto made concrete: gold on the synthetic task; on real data alpaca_eval when its
    annotator can run here (a local judge model, or an API key), else none. A new run stops in `preflight`
    before it gets there (`no_judge_error`): only an explicit eval.judge=none runs without a judge."""
    judge = requested_judge(cfg)
    if judge != "auto":
        return judge
    if task_of(cfg).default_judge(cfg):
        return task_of(cfg).default_judge(cfg)
    ae = cfg.eval.alpaca_eval
    if ae.annotator == "local" or os.environ.get("OPENAI_API_KEY"):
        return "alpaca_eval"
    return "none"


def no_judge_error(cfg) -> ConfigError:
    """Real data, eval.judge=auto and no annotator that can run here: what to set, one choice per line."""
    ae = cfg.eval.alpaca_eval
    return ConfigError(
        f"eval.judge=auto found no judge that can run here for data.name={cfg.data.name}: "
        f"eval.alpaca_eval.annotator={ae.annotator} needs OPENAI_API_KEY, which is not set. A run without a "
        f"judge has no win rate, so choose one:\n"
        f"  export OPENAI_API_KEY=...                       (the alpaca_eval annotator {ae.annotator})\n"
        f"  eval.alpaca_eval.annotator=local eval.alpaca_eval.local_model=<judge LLM, hub id or folder>\n"
        f"  eval.judge=reward_model eval.reward_model.path=<sequence-classifier RM, hub id or folder>\n"
        f"  eval.judge=none                                  (outputs only; judge the run dir later)")


def prompts_suffix(cfg) -> str:
    """What tells apart the verdicts, win_rate.csv rows and outputs of another prompt set than the default
    (AlpacaEval's instructions on real data, the held-out prompts of the synthetic task): `@<eval.prompts>`."""
    return task_of(cfg).prompts_suffix(cfg)


def judge_name(cfg, judge: str) -> str:
    """The name a judge's verdicts and win_rate.csv rows go under (without building the judge)."""
    return base_judge_name(cfg, judge) + prompts_suffix(cfg)


def base_judge_name(cfg, judge: str) -> str:
    """The judge's own name (its annotation cache, the verdicts' `annotator`), whatever the prompts."""
    if judge == "reward_model":
        return f"reward_model-{short_name(cfg.eval.reward_model.path)}"
    if judge == "alpaca_eval":
        ae = cfg.eval.alpaca_eval
        return f"local_{short_name(ae.local_model)}" if ae.annotator == "local" else short_name(ae.annotator)
    return judge


def preflight(cfg) -> None:
    """Fail in seconds, not after training: a missing reward model, judge model or API key, or a judge model that
    cannot be built here (its config.json is read: unknown architecture, remote code not allowed; no weights), or
    real data with eval.judge=auto and no judge at all (only an explicit eval.judge=none runs without one)."""
    from ..reward_models.architecture import check_causal_lm, check_reward_model

    judge = resolve_judge(cfg)
    if judge == "none" and requested_judge(cfg) == "auto":
        raise no_judge_error(cfg)
    if judge == "reward_model":
        from ..hub import resolve_pretrained

        rm = cfg.eval.reward_model
        source = resolve_pretrained(rm.path, "eval.reward_model.path",
                                    "Point eval.reward_model.path at a local folder with the reward model's files.")
        check_reward_model(source, "eval.reward_model.path", rm.trust_remote_code)
    elif judge == "alpaca_eval":
        from .local_judge import check_packaged_annotator, local_source

        ae = cfg.eval.alpaca_eval
        if ae.annotator == "local":
            check_causal_lm(local_source(ae.local_model), "eval.alpaca_eval.local_model")
        else:
            check_packaged_annotator(ae.annotator)


def build_judge(cfg, workdir: Path, name: str | None = None):
    """The judge `name` (default: `eval.judge`, resolved), or None for none."""
    name = name or resolve_judge(cfg)
    if name == "none":
        return None
    if name not in JUDGES:
        raise ConfigError(f"eval.judge: unknown judge {name!r}; registered: {', '.join(sorted(JUDGES))}, none")
    return JUDGES[name](cfg, workdir)
