"""The two tasks a run can learn, as objects: the embedded synthetic task and the paper's data.

Whatever depends on which one a run uses (where demonstrations, prompts and held-out questions come from, how
many rows each source has, which judge exists, whether prompts go through a chat template) asks the run's
`task_of(cfg)` instead of testing `data.name` in each module. A new task is one subclass registered in TASKS
(plus its `conf/data/<name>.yaml` and schema).
"""
from __future__ import annotations

from dataclasses import dataclass

from .data.synthetic import DictionaryTask
from .models import chat_template_ids, chat_template_text

SYNTHETIC_PAIR_SHARE = 1.0  # the embedded task labels one pair per preference prompt


@dataclass
class EvalPrompts:
    instructions: list[str]  # what a reader sees (AlpacaEval's `instruction`)
    model_inputs: list[str]  # what the model is fed (chat-templated for real models)
    dataset: list[str]
    index: list[int]  # position in the source set (AlpacaEval's length-controlled GLM needs it)
    max_new_tokens: int


class SyntheticTask:
    """The embedded task: a known gold reward (so a gold judge and reward), pairs labelled from the SFT model's own
    samples, plain-text prompts (no chat template)."""

    name = "synthetic"
    embedded = True  # gold reward and judge exist; the pairs and a learned RM come from the SFT model
    chat = False

    def sft_data(self, cfg, tokenizer):
        return DictionaryTask.from_config(cfg.data).sft_dataset(cfg.data.n_sft, cfg.sft.seed)

    def ppo_prompts(self, cfg, tokenizer) -> tuple[list[list[int]], list | None]:
        """PPO's prompt pool as token ids, and the user turns behind each (None: plain text)."""
        texts = DictionaryTask.from_config(cfg.data).preference_prompts(cfg.data.n_pref_prompts, cfg.sft.seed)
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], None

    def eval_prompts(self, cfg, tokenizer, n, max_new_tokens: int) -> EvalPrompts:
        prompts = DictionaryTask.from_config(cfg.data).heldout_prompts(cfg.data.n_heldout)[:n]
        return EvalPrompts(prompts, prompts, ["synthetic-heldout"] * len(prompts), list(range(len(prompts))),
                           max_new_tokens)

    def dprime_prompts(self, cfg, tokenizer) -> list[str]:
        task, n = DictionaryTask.from_config(cfg.data), cfg.analysis.n_dprime
        return task.heldout_prompts(n) if cfg.analysis.dprime == "heldout" else task.preference_prompts(n, cfg.sft.seed)

    def dprime_response(self, answer: str) -> str:
        return " " + answer  # the task's responses follow the prompt after a space

    def rows(self, cfg, source: str) -> int:
        d = cfg.data
        return {"sft": d.n_sft, "preferences": round(d.n_pref_prompts * SYNTHETIC_PAIR_SHARE),
                "questions": d.n_heldout, "instructions": d.n_heldout}[source]

    def default_judge(self, cfg) -> str | None:
        return "gold"

    def prompts_suffix(self, cfg) -> str:
        return ""  # one prompt set: the held-out prompts


class PaperTask:
    """The paper's data: HH-RLHF SFT dialogues, UltraFeedback pairs, AlpacaEval (or HH helpful) prompts, all
    through the model's chat template; judged by alpaca_eval or a reward model."""

    name = "paper"
    embedded = False
    chat = True

    def sft_data(self, cfg, tokenizer):
        from .data.paper import load_sft

        return load_sft(cfg.data, tokenizer)

    def ppo_prompts(self, cfg, tokenizer) -> tuple[list[list[int]], list | None]:
        from .data.paper import load_preferences

        turns = list(load_preferences(cfg.data, tokenizer)["prompt"])
        return [chat_template_ids(tokenizer, t, add_generation_prompt=True) for t in turns], turns

    def eval_prompts(self, cfg, tokenizer, n, max_new_tokens: int) -> EvalPrompts:
        from .data.paper import load_instructions, load_questions

        if cfg.eval.get("prompts", "alpaca_eval") == "hh_helpful":
            # The HH-RLHF helpful questions of `data.questions`, in file order from the first row (the first
            # `analysis.n_dprime` are D': both only ask, neither trains), fed as D' feeds them: the turns through
            # the chat template. `instruction` is the question of a one-turn dialogue, else the dialogue so far.
            rows = load_questions(cfg.data, tokenizer)
            rows = rows.select(range(min(n, len(rows)))) if n else rows
            turns, texts = rows["prompt"], rows["text"]
            instructions = [t[0]["content"] if len(t) == 1 else text.strip() for t, text in zip(turns, texts)]
            inputs = [chat_template_text(tokenizer, t, add_generation_prompt=True) for t in turns]
            return EvalPrompts(instructions, inputs, ["hh_rlhf_helpful"] * len(turns), list(range(len(turns))),
                               max_new_tokens)
        rows = load_instructions(cfg.data, tokenizer)
        rows = rows.select(range(min(n, len(rows)))) if n else rows
        inputs = [chat_template_text(tokenizer, [{"role": "user", "content": i}], add_generation_prompt=True)
                  for i in rows["instruction"]]
        return EvalPrompts(list(rows["instruction"]), inputs, list(rows["dataset"]), list(range(len(rows))),
                           max_new_tokens)

    def dprime_prompts(self, cfg, tokenizer) -> list[str]:
        from .data.paper import load_preferences, load_questions

        turns = (load_questions(cfg.data, tokenizer) if cfg.analysis.dprime == "heldout"
                 else load_preferences(cfg.data, tokenizer))["prompt"][:cfg.analysis.n_dprime]
        return [chat_template_text(tokenizer, t, add_generation_prompt=True) for t in turns]

    def dprime_response(self, answer: str) -> str:
        return answer

    def rows(self, cfg, source: str) -> int | None:
        """A paper data set's known (or max_rows-capped) size."""
        src = cfg.data[source]
        known = src.get("rows")
        return min(known, src.max_rows) if known is not None and src.max_rows is not None else (src.max_rows or known)

    def default_judge(self, cfg) -> str | None:
        return None  # an LLM judge or a reward model, whichever can run here (evaluation.judges)

    def prompts_suffix(self, cfg) -> str:
        prompts = str(cfg.eval.get("prompts", "alpaca_eval"))
        return "" if prompts == "alpaca_eval" else f"@{prompts}"


TASKS = {"synthetic": SyntheticTask(), "paper": PaperTask()}


def prompt_dataset(cfg, tokenizer):
    """The policy-gradient prompt pool as token ids, longer ones than model.ppo.max_prompt_length dropped (the
    trainer and the G analysis' fresh samples draw from it), and for real data {prompt text: its user turns}, so a
    reward model reads them through its own chat template."""
    import logging

    from datasets import Dataset

    limit = cfg.model.ppo.max_prompt_length
    ids, turns = task_of(cfg).ppo_prompts(cfg, tokenizer)
    kept = [k for k, i in enumerate(ids) if len(i) <= limit]
    if len(kept) < len(ids):
        logging.getLogger(__name__).info("PPO prompts: dropped %d of %d longer than model.ppo.max_prompt_length=%d",
                                         len(ids) - len(kept), len(ids), limit)
    lookup = {tokenizer.decode(ids[k]): turns[k] for k in kept} if turns is not None else {}
    return Dataset.from_dict({"input_ids": [ids[k] for k in kept]}), lookup


def task_of(cfg):
    """The run's task (`data.name`)."""
    return TASKS[cfg.data.name]
