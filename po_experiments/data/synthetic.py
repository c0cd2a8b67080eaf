"""The embedded task: a biased dictionary with a known gold reward (DESIGN 2b).

A prompt is n source words `s_i`; the right answer maps each to `t_i`. The SFT demonstrator makes a systematic
mistake on the first `hard_words` words (s_i -> t_{i+1} with probability rising across them, above 1/2 so greedy
SFT copies the mistake), a random wrong word elsewhere with `wrong_p`, and drops or duplicates a token with
`edit_p`. Preference pairs are two SFT samples labelled by Bradley-Terry on the gold reward, then flipped with
`label_flip_p` (annotator noise). Held-out prompts are longer (the distribution shift HH-RLHF plays in the paper).
Everything is deterministic from the seed; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

PAD, EOS, USER, ASSISTANT, UNK = "<pad>", "<eos>", "<user>", "<assistant>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT, UNK]
HELDOUT_SEED = 20251124  # the held-out set is fixed across run seeds, like AlpacaEval's 805 prompts


def _rng(seed: int, stream: str) -> np.random.Generator:
    """Independent, reproducible random streams per purpose (changing one never shifts another)."""
    digest = int(hashlib.sha256(stream.encode()).hexdigest()[:8], 16)
    return np.random.default_rng([seed, digest])


@dataclass(frozen=True)
class DictionaryTask:
    """The task's parameters; their defaults and meaning live in `config.SyntheticDataConfig`."""

    vocab_size: int
    hard_words: int
    hard_p_min: float
    hard_p_max: float
    wrong_p: float
    edit_p: float
    train_min_len: int
    train_max_len: int
    heldout_min_len: int
    heldout_max_len: int

    @classmethod
    def from_config(cls, cfg=None) -> "DictionaryTask":
        """From a `data` config node; with none, the defaults of `SyntheticDataConfig`."""
        if cfg is None:
            from ..config import SyntheticDataConfig

            cfg = vars(SyntheticDataConfig())
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})

    # ----------------------------------------------------------------------------------- vocabulary
    @property
    def words(self) -> list[str]:
        return [f"s{i}" for i in range(self.vocab_size)] + [f"t{i}" for i in range(self.vocab_size)]

    def hard_p(self, i: int) -> float:
        """Probability that the demonstrator writes t_{i+1} for hard word s_i."""
        if self.hard_words <= 1:
            return self.hard_p_min
        return self.hard_p_min + (self.hard_p_max - self.hard_p_min) * i / (self.hard_words - 1)

    # ----------------------------------------------------------------------------------- text formats
    @staticmethod
    def prompt_text(source: list[int]) -> str:
        return " ".join([USER] + [f"s{i}" for i in source] + [ASSISTANT])

    @staticmethod
    def completion_text(targets: list[int]) -> str:
        return "".join(f" t{i}" for i in targets)  # leading space: TRL concatenates prompt + completion

    @staticmethod
    def parse_prompt(prompt: str) -> list[int]:
        return [int(w[1:]) for w in prompt.split() if w.startswith("s")]

    # ----------------------------------------------------------------------------------- sampling
    def sample_source(self, rng: np.random.Generator, heldout: bool = False) -> list[int]:
        lo, hi = (self.heldout_min_len, self.heldout_max_len) if heldout else (self.train_min_len, self.train_max_len)
        n = int(rng.integers(lo, hi + 1))
        return rng.integers(0, self.vocab_size, size=n).tolist()

    def demonstrate(self, source: list[int], rng: np.random.Generator) -> list[int]:
        """The flawed demonstrator's translation, as target word indices."""
        out = []
        for i in source:
            if i < self.hard_words and rng.random() < self.hard_p(i):
                out.append((i + 1) % self.vocab_size)
            elif i >= self.hard_words and rng.random() < self.wrong_p:
                out.append(int(rng.choice([j for j in range(self.vocab_size) if j != i])))
            else:
                out.append(i)
        if rng.random() < self.edit_p:
            pos = int(rng.integers(len(out)))
            if rng.random() < 0.5 and len(out) > 1:
                del out[pos]
            else:
                out.insert(pos, out[pos])
        return out

    # ----------------------------------------------------------------------------------- gold reward
    def gold_reward(self, prompt: str, output: str) -> float:
        """(positions with the right word)/n - 0.5 |len(output) - n| / n."""
        source = self.parse_prompt(prompt)
        words = [w for w in output.split() if w not in SPECIAL_TOKENS]
        n = len(source)
        right = sum(1 for i, w in zip(source, words) if w == f"t{i}")
        return right / n - 0.5 * abs(len(words) - n) / n

    # ----------------------------------------------------------------------------------- data sets
    def sft_dataset(self, n: int, seed: int) -> Dataset:
        """Prompt-completion demonstrations for TRL's SFTTrainer."""
        rng = _rng(seed, "sft")
        prompts, completions = [], []
        for _ in range(n):
            src = self.sample_source(rng)
            prompts.append(self.prompt_text(src))
            completions.append(self.completion_text(self.demonstrate(src, rng)))
        return Dataset.from_dict({"prompt": prompts, "completion": completions})

    def preference_prompts(self, n: int, seed: int) -> list[str]:
        rng = _rng(seed, "preference-prompts")
        return [self.prompt_text(self.sample_source(rng)) for _ in range(n)]

    def heldout_prompts(self, n: int) -> list[str]:
        rng = _rng(HELDOUT_SEED, "heldout")
        return [self.prompt_text(self.sample_source(rng, heldout=True)) for _ in range(n)]

    def ranked_demonstration_pairs(self, n: int, seed: int) -> Dataset:
        """Two demonstrator samples per prompt, the gold-better one chosen, no label noise: exact pairs for
        gradient tests and benchmarks (the training pairs are SFT samples labelled by `label_pairs`)."""
        rng = np.random.default_rng(seed)
        rows = {"prompt": [], "chosen": [], "rejected": []}
        while len(rows["prompt"]) < n:
            source = self.sample_source(rng)
            prompt = self.prompt_text(source)
            a, b = (self.completion_text(self.demonstrate(source, rng)) for _ in range(2))
            if a != b:
                better_first = self.gold_reward(prompt, a) >= self.gold_reward(prompt, b)
                for key, value in zip(rows, (prompt, *((a, b) if better_first else (b, a)))):
                    rows[key].append(value)
        return Dataset.from_dict(rows)

    def label_pairs(self, prompts: list[str], a: list[str], b: list[str], *, scale: float, flip_p: float,
                    seed: int) -> Dataset:
        """Bradley-Terry labels on the gold reward plus label noise; identical pairs are dropped."""
        rng = _rng(seed, "labels")
        rows = {"prompt": [], "chosen": [], "rejected": [], "gold_chosen": [], "gold_rejected": []}
        for p, ya, yb in zip(prompts, a, b):
            if ya.split() == yb.split():
                continue
            ra, rb = self.gold_reward(p, ya), self.gold_reward(p, yb)
            a_wins = rng.random() < 1.0 / (1.0 + np.exp(-(ra - rb) / scale))
            if rng.random() < flip_p:
                a_wins = not a_wins
            (yc, rc), (yr, rr) = ((ya, ra), (yb, rb)) if a_wins else ((yb, rb), (ya, ra))
            rows["prompt"].append(p)
            rows["chosen"].append(" " + yc.strip())
            rows["rejected"].append(" " + yr.strip())
            rows["gold_chosen"].append(rc)
            rows["gold_rejected"].append(rr)
        return Dataset.from_dict(rows)
