"""PPO's scalar reward: text in, one float per response out.

Three sources behind one interface (`RewardFunction`):
- `GoldReward`: the embedded task's exact reward (what the win rate measures);
- `ClassifierReward`: a sequence-classification reward model: one trained here on the synthetic pairs with TRL's
  RewardTrainer (`reward.kind=learned`), or a hub id / local copy such as ArmoRM or Skywork (`kind=classifier`).
  ArmoRM is built natively (`reward_models.armorm`, chosen by its config's architecture name), never from its
  remote code; `preflight_reward` checks from config.json alone, before SFT, that the reward model can be built.
Scoring works on decoded text because the policy's tokenizer and the reward model's may differ (Pythia policy,
Llama-3 reward model). `build_reward(cfg, sft_dir)` picks one from `cfg.reward`.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import RewardConfig as TRLRewardConfig  # not to be confused with our config.RewardConfig
from trl import RewardTrainer
from trl.trainer.reward_trainer import suppress_seqcls_warning

from . import distributed
from .cache import cached
from .checkpoints import StepCounter, build_checkpointing, resumed_step
from .data.synthetic import ASSISTANT, USER, DictionaryTask
from .errors import ConfigError, ModelUnavailableError
from .hub import resolve_pretrained
from .models import DTYPES, chat_template_text
from .reward_models.architecture import check_reward_model
from .reward_models.armorm import ArmoRMForScoring, load_armorm
from .stages.common import batch_split
from .trainers.resume import ExactResumeMixin
from .config import RewardHparams, stage_settings
from .stages.pairs import pair_key, preference_data
from .stages.sft import task_sft_dir

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]  # [{"role": "user", "content": ...}, ...]
# How a ClassifierReward recovers the user turns behind a prompt text (for the RM's chat template).
MessagesLookup = Union[Mapping[str, Messages], Callable[[str], Optional[Messages]]]

HELDOUT_FRACTION = 0.1  # the last 10 % of the pairs: the learned RM's held-out accuracy


class RewardFunction(Protocol):
    """`score(prompts, responses)` -> float32 tensor [B] on CPU.

    `prompts` are the texts the policy was fed (chat-templated for real models, "<user> s.. <assistant>" for the
    synthetic task); `responses` the decoded completions without special tokens. `messages`, when given, are the
    original user turns of each prompt; rewards that cannot use them ignore them."""

    name: str

    def score(self, prompts: list[str], responses: list[str],
              messages: Optional[Sequence[Optional[Messages]]] = None) -> torch.Tensor: ...


def _check_batch(prompts, responses, messages=None) -> None:
    if len(prompts) != len(responses) or (messages is not None and len(messages) != len(prompts)):
        raise ValueError(f"prompts ({len(prompts)}), responses ({len(responses)}) and messages "
                         f"({'-' if messages is None else len(messages)}) must have the same length")


# --------------------------------------------------------------------------------------------- gold


class GoldReward:
    """The embedded task's gold reward: exact and free, so PPO optimises what the win rate measures."""

    name = "gold"

    def __init__(self, task: DictionaryTask):
        self.task = task

    def score(self, prompts, responses, messages=None) -> torch.Tensor:
        _check_batch(prompts, responses, messages)
        return torch.tensor([self.task.gold_reward(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)


# --------------------------------------------------------------------------------------------- classifier


def reward_from_output(output) -> torch.Tensor:
    """One float32 reward per sequence, on CPU, from a reward model's forward output.

    ArmoRM's custom output carries its preference score in `.score` ([B, 1] or [B]) beside per-objective `logits`,
    so `score` wins when present; plain classifiers (Skywork, the learned RM) have only `logits` [B, labels],
    whose first column is the reward."""
    score = getattr(output, "score", None)
    if isinstance(score, torch.Tensor):
        if score.dim() == 2 and score.shape[1] == 1:
            score = score[:, 0]
        if score.dim() != 1:
            raise ValueError(f"reward model output .score has shape {tuple(score.shape)}; expected [B] or [B, 1]")
        return score.detach().float().cpu()
    return output.logits[:, 0].detach().float().cpu()


def align_pad_token(model, tokenizer) -> None:
    """Make the tokenizer pad with the id the model skips when it looks for the last real token.

    Sequence classifiers read the reward at the last non-pad token (found via `config.pad_token_id`); a pad id the
    model does not know would make the score depend on the padding."""
    model_pad = model.config.pad_token_id
    if model_pad is not None and tokenizer.pad_token_id != model_pad:
        token = tokenizer.convert_ids_to_tokens(model_pad)
        if token is not None:  # an id outside the tokenizer's vocabulary: the model follows the tokenizer below
            tokenizer.pad_token = token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


END_OF_TURN = "<|eot_id|>"  # Llama-3's end of a chat turn: the last token a Llama-3 reward model reads


def spare_pad_token(tokenizer, taken: set[int], n_embeddings: int) -> Optional[str]:
    """A special token no conversation contains, to pad with: a pad-named one first (Llama-3.1's
    `<|finetune_right_pad_id|>`), else a reserved one (`<|reserved_special_token_N|>`)."""
    specials = [(i, t.content) for i, t in tokenizer.added_tokens_decoder.items()
                if t.special and i not in taken and i < n_embeddings]
    for marker in ("pad", "reserved"):
        found = sorted(i for i, content in specials if marker in content.lower())
        if found:
            return tokenizer.convert_ids_to_tokens(found[0])
    return None


def ensure_pad_is_not_end_of_turn(model, tokenizer, name: str, *, pools_by_pad_id: bool = True) -> None:
    """Llama-3-style reward models (the tokenizer knows `<|eot_id|>`): the pad id must differ from EOS and
    `<|eot_id|>`. A sequence classifier reads its score at the last token that is not the pad id, so padding with
    the token every conversation ends with would read the score one token early (TRL PR 6952). The fix: pad with
    a spare special token of the tokenizer; without one, a clear error (set pad_token_id in config.json).
    ArmoRM reads the last attended position instead (`pools_by_pad_id=False`): it only gets the spare pad when
    there is one."""
    eot = tokenizer.get_vocab().get(END_OF_TURN)
    if eot is None:
        return  # not a Llama-3 chat tokenizer; GPT-style RMs trained with pad = EOS keep what they were trained with
    ends = {i for i in (eot, tokenizer.eos_token_id) if i is not None}
    if tokenizer.pad_token_id not in ends:
        return
    spare = spare_pad_token(tokenizer, ends | {tokenizer.bos_token_id}, model.get_input_embeddings().num_embeddings)
    if spare is None:
        if pools_by_pad_id:
            raise ModelUnavailableError(
                f"{name}: its pad id {tokenizer.pad_token_id} is EOS/{END_OF_TURN}, so the score would be read before "
                f"the final {END_OF_TURN}, and its tokenizer has no spare special token to pad with. Set "
                "pad_token_id in its config.json to an id no conversation contains")
        return
    log.warning("%s: pad id %s is EOS/%s (the score would be read one token early); padding with %s instead",
                name, tokenizer.pad_token_id, END_OF_TURN, spare)
    tokenizer.pad_token = spare
    model.config.pad_token_id = tokenizer.pad_token_id


def load_classifier(source: str, dtype: torch.dtype, trust_remote_code: bool, key: str):
    """A sequence classifier through transformers' Auto class; a missing weight (a reward head that would be drawn
    at random) is an error naming it."""
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
    except ImportError as err:  # remote code written for another transformers version
        raise ModelUnavailableError(
            f"{key}={source}: its custom code does not import with this transformers version ({err}). Use a "
            "transformers release the model supports, or a local copy with updated code.") from err
    if info.get("missing_keys"):
        raise ModelUnavailableError(f"{key}={source}: weights missing from the checkpoint (they would be random): "
                                    f"{sorted(info['missing_keys'])}")
    return model


class ClassifierReward:
    """A sequence-classification reward model and its tokenizer: ArmoRM built natively, any other through
    AutoModelForSequenceClassification (`reward_models.architecture` decides from config.json).

    Input format per example: if the RM's tokenizer has a chat template and the user turns of the prompt are known
    (`score(..., messages=...)`, or the constructor's `messages` lookup from prompt text to turns), the RM reads
    those turns plus an assistant turn with the response, through its own template (how ArmoRM / Skywork were
    trained). Otherwise it reads prompt + response + EOS, the text TRL's RewardTrainer trains on for
    non-conversational pairs (the learned synthetic RM shares the policy's word tokenizer)."""

    def __init__(self, path_or_id: str | Path, *, trust_remote_code: bool = False, dtype: str = "float32",
                 batch_size: int = 32, device: str | torch.device | None = None,
                 messages: Optional[MessagesLookup] = None, key: str = "reward.path"):
        self.name = f"classifier:{path_or_id}"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.messages = messages
        self._warned = False
        source = str(path_or_id)
        self.builder = check_reward_model(source, key, trust_remote_code)
        remote = self.builder == "remote"  # ArmoRM's remote code is never run, whatever trust_remote_code says
        self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
        if self.builder == "armorm":
            self.model = load_armorm(source, self.tokenizer, dtype=DTYPES[dtype], key=key)
        else:
            self.model = load_classifier(source, DTYPES[dtype], remote, key)
        self.model = self.model.to(self.device).eval()
        align_pad_token(self.model, self.tokenizer)
        ensure_pad_is_not_end_of_turn(self.model, self.tokenizer, f"{key}={source}",
                                      pools_by_pad_id=not isinstance(self.model, ArmoRMForScoring))

    # -- formatting ---------------------------------------------------------------------------------------
    def _turns(self, prompt: str) -> Optional[Messages]:
        if self.messages is None:
            return None
        return self.messages(prompt) if callable(self.messages) else self.messages.get(prompt)

    def format(self, prompt: str, response: str, turns: Optional[Messages] = None) -> tuple[str, bool]:
        """(text the RM reads, whether the text already holds its special tokens)."""
        turns = turns if turns is not None else self._turns(prompt)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if turns is not None and has_template:
            conversation = [*turns, {"role": "assistant", "content": response}]
            return chat_template_text(self.tokenizer, conversation), True
        if has_template and not self._warned:  # works, but the RM reads the policy's template, not its own
            log.warning("%s has a chat template but no user turns were given: scoring prompt + response text",
                        self.name)
            self._warned = True
        eos = self.tokenizer.eos_token or ""
        text = prompt + response
        return (text if text.endswith(eos) else text + eos), False

    def encode(self, prompts, responses, messages=None) -> list[list[int]]:
        _check_batch(prompts, responses, messages)
        ids = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            text, templated = self.format(p, r, None if messages is None else messages[i])
            # a chat template writes BOS etc. itself; plain text gets what TRL's tokenization adds in training
            ids.append(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])
        return ids

    # -- scoring ------------------------------------------------------------------------------------------
    def _pad_right(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right padding: real tokens keep the positions they have alone, and causal attention never sees pads."""
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    @torch.no_grad()
    def score(self, prompts, responses, messages=None) -> torch.Tensor:
        ids = self.encode(prompts, responses, messages)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
        rewards = torch.empty(len(ids), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            output = self.model(**self._pad_right([ids[i] for i in chunk]))
            rewards[chunk] = reward_from_output(output)
        return rewards


def pairwise_accuracy(reward: RewardFunction, pairs) -> float:
    """Share of pairs whose chosen response the reward scores higher (ties count one half)."""
    chosen = reward.score(list(pairs["prompt"]), list(pairs["chosen"]))
    rejected = reward.score(list(pairs["prompt"]), list(pairs["rejected"]))
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


# --------------------------------------------------------------------------------------------- learned RM


def _trl_reward_args(cfg, checkpoint_root: Path) -> TRLRewardConfig:
    """TRL RewardConfig from `cfg.reward.train` (a RewardHparams, smaller than a stage's StageHparams)."""
    hp = cfg.reward.train
    per_device, accumulation = batch_split(hp.batch_size, None)
    return TRLRewardConfig(
        output_dir=str(checkpoint_root),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.epochs,
        warmup_steps=hp.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="linear",
        max_length=cfg.model.max_length,
        seed=cfg.sft.seed,  # trained once per SFT model and pair set, shared by every PO seed
        data_seed=cfg.sft.seed,
        full_determinism=cfg.runtime.deterministic,
        report_to=[],
        save_strategy="steps" if hp.save_steps > 0 else "no",  # and every runtime.checkpoint_every_min minutes
        save_steps=hp.save_steps if hp.save_steps > 0 else 500,
        logging_steps=10,
        bf16=False,  # TRL defaults to bf16; the learned RM is the tiny model, trained in float32
        activation_checkpointing=False,  # TRL turns it on by default; pure overhead for a model this small
        dataset_num_proc=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _gold_agreement(cfg, reward: RewardFunction, pairs) -> Optional[float]:
    """Synthetic task: share of pairs with a gold-better response that the RM ranks the same way."""
    if cfg.data.name != "synthetic":
        return None
    task = DictionaryTask.from_config(cfg.data)
    prompts = list(pairs["prompt"])
    gold_c = torch.tensor([task.gold_reward(p, y) for p, y in zip(prompts, pairs["chosen"])])
    gold_r = torch.tensor([task.gold_reward(p, y) for p, y in zip(prompts, pairs["rejected"])])
    decided = gold_c != gold_r
    rm_c, rm_r = reward.score(prompts, list(pairs["chosen"])), reward.score(prompts, list(pairs["rejected"]))
    agree = (rm_c > rm_r) == (gold_c > gold_r)
    return agree[decided].float().mean().item() if decided.any() else None


class ResumableRewardTrainer(ExactResumeMixin, RewardTrainer):
    """RewardTrainer whose resume restores every weight through from_pretrained (trainers/resume.py)."""


def train_reward_model(cfg, sft_dir: Path, out_dir: Path) -> None:
    """TRL RewardTrainer on the preference pairs, starting from the SFT weights with a fresh 1-label head.

    `out_dir` is the cache-build folder: checkpoints go to its `checkpoints/` (the newest only) and a build killed
    and started again resumes from there, as SFT does."""
    out_dir = Path(out_dir)
    metrics_file = out_dir / "reward_metrics.json"  # written last: a build killed after it has only to clean up
    if not metrics_file.exists():
        _train_reward_model(cfg, sft_dir, out_dir, metrics_file)
    if distributed.is_main():
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def _train_reward_model(cfg, sft_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    pairs = preference_data(cfg, sft_dir, tokenizer)
    n_train = len(pairs) - max(1, round(HELDOUT_FRACTION * len(pairs)))
    train, heldout = pairs.select(range(n_train)), pairs.select(range(n_train, len(pairs)))

    checkpoint_root = out_dir / "checkpoints"
    resume, callbacks = build_checkpointing(cfg, checkpoint_root, "kill_at_reward_step")
    set_seed(cfg.sft.seed)  # the new score head is drawn at load time
    with suppress_seqcls_warning():  # "lm head unexpected, score head missing" is the point of this load
        model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    align_pad_token(model, tokenizer)
    counter = StepCounter()
    trainer = ResumableRewardTrainer(model=model, args=_trl_reward_args(cfg, checkpoint_root), train_dataset=train,
                                     processing_class=tokenizer, callbacks=[*callbacks, counter])
    start = resumed_step(resume)  # before training: only the newest checkpoint is kept
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(out_dir))
    distributed.end_of_training()
    if not distributed.is_main():
        return
    tokenizer.save_pretrained(str(out_dir))

    rm = ClassifierReward(out_dir, batch_size=256, device="cpu")  # measured through the same path PPO scores with
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "train_pairs": len(train),
               "heldout_pairs": len(heldout), "heldout_accuracy": pairwise_accuracy(rm, heldout),
               "heldout_gold_agreement": _gold_agreement(cfg, rm, heldout),
               "resumed_from_step": start, "steps_in_this_job": counter.steps}
    metrics_file.write_text(json.dumps(metrics, indent=2))
    log.info("reward model trained: %s", metrics)


def reward_key(cfg) -> dict:
    """What determines the learned RM: the pairs (and their SFT model) and its training settings but `how` ones."""
    return {**pair_key(cfg), "reward": stage_settings(cfg.reward.train, RewardHparams)}


def reward_model_dir(cfg, sft_dir: Path) -> Path:
    """The learned RM for this SFT model, pair set and RM hyper-parameters (trained once, then reused)."""
    sft_dir = task_sft_dir(cfg, sft_dir)  # the task's RM, from the SFT model with or without SFT before PO
    return cached(cfg.paths.cache_dir, "reward", reward_key(cfg), lambda out: train_reward_model(cfg, sft_dir, out),
                  collective=True, resumable=True)


# --------------------------------------------------------------------------------------------- builder


def _source_hint(path: str) -> str:
    return (f"Point at a local copy with reward.path=/path/to/{Path(path).name} (a folder with config.json, the "
            "weights and the tokenizer files), or run where the Hugging Face Hub can be reached.")


def resolve_reward_source(path: Optional[str]) -> str:
    """A loadable local folder or hub id for `reward.path`, or a ModelUnavailableError within seconds."""
    if not path:
        raise ConfigError("reward.path: set a hub id or local directory for reward.kind=classifier")
    return resolve_pretrained(path, "reward.path", _source_hint(path))


def _require_synthetic(cfg) -> None:
    if cfg.data.name != "synthetic":
        raise ConfigError(f"reward.kind: {cfg.reward.kind!r} exists only for the synthetic task (data.name="
                          f"{cfg.data.name!r}); use reward=armorm or reward=skywork (kind=classifier)")


def synthetic_user_turn(prompt: str) -> Messages:
    """The synthetic task's prompt `<user> s3 s1 <assistant>` as a user turn (`s3 s1`), so a chat reward model
    (ArmoRM) reads it through its own template, as it would a real conversation."""
    return [{"role": "user", "content": " ".join(w for w in prompt.split() if w not in (USER, ASSISTANT))}]


def preflight_reward(cfg) -> None:
    """Fail in seconds, before SFT, when PPO's classifier reward model cannot be built here: not found, an
    unreadable config.json, an unknown architecture, or remote code that is not allowed (reads no weights)."""
    if cfg.algo.family == "ppo" and cfg.reward.kind == "classifier":
        check_reward_model(resolve_reward_source(cfg.reward.path), "reward.path", cfg.reward.trust_remote_code)


def build_reward(cfg, sft_dir: Path, *, messages: Optional[MessagesLookup] = None) -> RewardFunction:
    """The reward PPO optimises, from `cfg.reward.kind`: gold | learned | classifier.

    `messages` (prompt text -> its user turns) lets a chat reward model read the conversation through its own
    template; callers may also pass turns per call to `score`."""
    kind, rc = cfg.reward.kind, cfg.reward
    if rc.dtype not in DTYPES:
        raise ConfigError(f"reward.dtype: must be one of {', '.join(DTYPES)}, got {rc.dtype!r}")
    if kind == "gold":
        _require_synthetic(cfg)
        return GoldReward(DictionaryTask.from_config(cfg.data))
    if kind == "learned":
        _require_synthetic(cfg)
        return ClassifierReward(reward_model_dir(cfg, sft_dir), dtype=rc.dtype, batch_size=rc.batch_size)
    if kind == "classifier":
        source = resolve_reward_source(rc.path)
        if messages is None and cfg.data.name == "synthetic":
            messages = synthetic_user_turn
        return ClassifierReward(source, trust_remote_code=rc.trust_remote_code, dtype=rc.dtype,
                                batch_size=rc.batch_size, messages=messages)
    raise ConfigError(f"reward.kind: unknown kind {kind!r}; choose gold, learned or classifier")
