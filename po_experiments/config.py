"""Structured config schemas (Hydra ConfigStore) and the checks OmegaConf's types cannot express.

The YAML tree under `conf/` mirrors these dataclasses: every group option starts from its schema here, so a
typo (`algo.bta=0.2`), a wrong type (`seed=abc`) or an unknown option fails at composition naming the key.
Ranges and cross-field rules (`t2 > t1`, probabilities in [0, 1], non-negative steps) are checked by
`validate()`, which `run.py` calls before any work starts.
"""
from __future__ import annotations

import re
import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError
from .objectives import OBJECTIVES, components_of, objective_of
from .objectives.pairwise import PairwiseConfig as DPOAlgoConfig  # noqa: F401  (re-exported for scripts)
from .objectives.pairwise_losses import CDPOConfig as CDPOAlgoConfig  # noqa: F401
from .objectives.policy_gradient import PPOAlgoConfig  # noqa: F401

# --------------------------------------------------------------------------------------------- enums


class OnInvalid(str, Enum):
    skip = "skip"  # drop the row, count it, log the counts
    fail = "fail"  # stop with a report naming row index and field


class Judge(str, Enum):
    auto = "auto"  # gold for the synthetic task, alpaca_eval for the paper's data
    gold = "gold"  # the embedded task's known reward
    reward_model = "reward_model"  # any sequence-classification reward model (eval.reward_model.path)
    alpaca_eval = "alpaca_eval"  # an LLM judge through the alpaca_eval package (eval.alpaca_eval)
    none = "none"  # write the outputs only


# --------------------------------------------------------------------------------------------- what keys hold
# Cache keys (SFT model, pairs, reward model, D' answers) and the analysis key are derived from these schemas by
# `stage_settings`, so a new setting is in every key unless its field says otherwise, next to its definition:
#   how(...)          changes how a result is computed, not what it is (checkpoint frequency, G's method): no key
#   read_by(stages)   read only by these stages (sft, pairs, reward, po, eval, analysis): only their keys
STAGES = ("sft", "pairs", "reward", "po", "eval", "analysis")


def how(**kw):
    """A field that changes how a result is computed, not what it is: in no cache or analysis key."""
    return field(metadata={"how": True}, **kw)


def read_by(*stages: str, **kw):
    """A field read only by these stages: in their keys, not in the others'."""
    assert set(stages) <= set(STAGES), stages
    return field(metadata={"read_by": stages}, **kw)


def _nested_schema(hint):
    """The dataclass of a field's type hint (`Optional[X]` -> X), or None."""
    for t in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def schema_of(node, fallback=()) -> type | None:
    """The dataclass schema of a config section: its structured type, or the one of `fallback` whose `name`
    default it carries (a section loaded from a run's saved YAML has lost its type)."""
    from omegaconf import DictConfig as _DictConfig

    typ = OmegaConf.get_type(node) if isinstance(node, _DictConfig) else None
    if dataclasses.is_dataclass(typ):
        return typ
    name = node.get("name") if hasattr(node, "get") else None
    return next((c for c in fallback if getattr(c, "name", None) == name), None)


def stage_settings(node, schema, stage: str | None = None, *, marked_only: bool = False) -> dict:
    """The settings of a config section (schema: its dataclass) that determine `stage`'s result, as plain values:
    every field but `how` ones and those `read_by` other stages (stage=None: every field but `how` ones);
    `marked_only`: only the fields `read_by` this stage (what it reads beyond what an earlier stage's key holds).
    Keys the schema does not know are kept (safe: a needless rebuild, never a stale reuse)."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if schema is None:
        return {} if marked_only else plain
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    out = {}
    for key, value in plain.items():
        f = fields.get(key)
        meta = f.metadata if f is not None else {}
        if meta.get("how"):
            continue
        readers = meta.get("read_by")
        if marked_only and not (readers and stage in readers):
            continue
        if readers and stage is not None and stage not in readers:
            continue
        sub = _nested_schema(hints.get(key)) if f is not None else None
        if sub is not None and isinstance(value, dict) and not marked_only:
            value = stage_settings(OmegaConf.create(value), sub, stage)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- model


@dataclass
class TinyArch:
    """A GPTNeoX (Pythia architecture) built from scratch for the embedded task."""

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64


@dataclass
class ModelShape:
    """A real model's architecture as its config.json states it: the planner sizes memory and time from it without
    downloading anything (a local `model.path` folder's own config.json takes precedence)."""

    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: Optional[int] = None  # None = num_attention_heads (no grouped-query attention)
    head_dim: Optional[int] = None  # None = hidden_size / num_attention_heads
    intermediate_size: int = MISSING
    vocab_size: int = MISSING
    tie_word_embeddings: bool = False
    gated_mlp: bool = False  # SwiGLU + RMSNorm (Llama, Qwen) vs GELU + LayerNorm (GPTNeoX)
    qk_norm: bool = False  # Qwen3's per-head query/key norms


@dataclass
class StageHparams:
    """Hyper-parameters of one training stage that depend on the model (paper App. C.1)."""

    batch_size: int = MISSING  # global batch (per_device x accumulation x processes)
    learning_rate: float = MISSING
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = how(default=0)  # checkpoint every k optimizer steps (0 = none)
    per_device_batch_size: Optional[int] = None  # None = batch_size / processes (no accumulation)


@dataclass
class PPOHparams(StageHparams):
    """PPO's rollout settings on top of the optimiser's (paper App. C.1: one response per prompt, top-p 0.9)."""

    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 256
    max_prompt_length: int = 256
    # prompts per generate() call in a rollout; None = the whole per-device rollout batch (batch_size / processes),
    # independent of the optimizer micro-batch (per_device_batch_size) used by the update and the forward passes
    generation_batch_size: Optional[int] = None


@dataclass
class PPOVariantDefaults:
    """The paper's per-model case settings for cPPO (lambda on TOP / MID) and hPPO (t3, tau), App. E."""

    lam_top: Optional[float] = None
    lam_mid: Optional[float] = None
    t3: Optional[float] = None
    tau: Optional[float] = None


@dataclass
class ScheduleSteps:
    """cDPO's (t1, t2) for this model (paper App. E cases); `algo.t1`/`algo.t2` read these by default."""

    t1: Optional[int] = None
    t2: Optional[int] = None


@dataclass
class ModelConfig:
    name: str = MISSING
    path: Optional[str] = None  # hub id or local directory; None builds the tiny model from `arch`
    arch: Optional[TinyArch] = None
    dtype: str = "float32"  # compute precision: float32 | bfloat16 | float16 (autocast over float32 master weights)
    pure_low_precision: bool = False  # weights and optimizer states in `dtype` too (no fp32 master copy: warned)
    # recompute activations in the backward; None = on for real models (model.path set), off for the tiny one
    activation_checkpointing: Optional[bool] = how(default=None)
    shape: Optional[ModelShape] = None  # the real model's architecture, for the dry-run plan (offline)
    trust_remote_code: bool = False
    max_length: int = 64  # tokens of prompt + response in training
    # Fixed in the chat template for every stage (models.fix_chat_template), e.g. Qwen3's {enable_thinking: false}
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    sft: StageHparams = field(default_factory=StageHparams)
    dpo: StageHparams = read_by("po", default_factory=StageHparams)  # the later stages' settings: not SFT's key
    cdpo: ScheduleSteps = read_by("po", default_factory=ScheduleSteps)
    ppo: PPOHparams = read_by("po", default_factory=PPOHparams)
    ppo_variants: PPOVariantDefaults = read_by("po", default_factory=PPOVariantDefaults)
    # Per-model settings of any other objective, {objective: {parameter: value}}, read by its YAML as
    # ${oc.select:model.cases.<objective>.<parameter>,<default>}: a new objective's per-model cases need no schema.
    cases: Dict[str, Dict[str, Any]] = read_by("po", default_factory=dict)


# --------------------------------------------------------------------------------------------- algorithms
# Each objective's schema lives next to it (po_experiments/objectives/) and is registered under `algo/<name>_schema`
# by `register_configs` from the registry (DPOAlgoConfig, CDPOAlgoConfig, PPOAlgoConfig stay importable from here).


# --------------------------------------------------------------------------------------------- rewards


@dataclass
class RewardHparams:
    """Training of a reward model on the preference pairs (TRL RewardTrainer), for `kind=learned`."""

    batch_size: int = 64
    learning_rate: float = 3e-4  # measured on the embedded pairs: held-out gold agreement 0.76-0.82
    epochs: float = 3.0
    warmup_ratio: float = 0.05
    save_steps: int = how(default=0)  # checkpoint every k steps to resume a killed build (0: by wall time only)


@dataclass
class RewardConfig:
    """Where PPO's scalar reward comes from."""

    name: str = MISSING
    kind: str = MISSING  # gold (embedded task) | learned (trained on the pairs) | classifier (hub id / local path)
    path: Optional[str] = None  # kind=classifier: e.g. RLHFlow/ArmoRM-Llama3-8B-v0.1
    trust_remote_code: bool = False
    batch_size: int = 32  # scoring batch
    dtype: str = "float32"
    shape: Optional[ModelShape] = None  # kind=classifier: its architecture, for the dry-run plan
    train: RewardHparams = field(default_factory=RewardHparams)


# --------------------------------------------------------------------------------------------- ablations


@dataclass
class AblationConfig:
    """Drop components inside a window of optimizer steps [start_step, stop_step) (paper Sec. 4)."""

    name: str = "none"
    drop: list[str] = field(default_factory=list)
    start_step: int = 0
    stop_step: Optional[int] = None  # None = until the end
    init_from: Optional[str] = None  # a checkpoint dir (e.g. a DPO run's step-6000) to continue from


# --------------------------------------------------------------------------------------------- controllers


@dataclass
class ControllerConfig:
    """Closed-loop coordination of positive and negative learning (paper Sec. 5.2, App. E): `none` trains as
    before; `g_balance` sets the objective's lambda from G_POS / G_NEG measured on a proxy target during training
    (po_experiments/controllers/g_balance.py documents the law). Every field is part of the run's identity."""

    name: str = "none"
    every: int = 15  # estimate G every k optimizer steps (first at step 0); 15: overhead <= 10 % on the tiny run
    n_questions: int = 16  # held-out questions the current model answers greedily: the proxy target
    refresh: int = 2  # regenerate those answers every k estimates (1: at every estimate)
    lambda_init: float = 0.0  # lambda before the first estimate: supervised (positive) learning first
    lambda_max: float = 1.0  # the largest lambda the controller may set
    ramp: float = 0.4  # the fastest 0 -> 1 move of lambda takes this fraction of the run's steps (the step bound)
    smoothing: float = 0.5  # weight of the newest G in the EMAs of G_POS and G_NEG (1 = no smoothing)
    max_new_tokens: int = 64  # the proxy answers' length cap (below data.max_new_tokens: its cost at paper scale)


# --------------------------------------------------------------------------------------------- data


@dataclass
class SyntheticDataConfig:
    """The embedded biased-dictionary task (DESIGN 2b): s_i -> t_i, with a demonstrator that errs."""

    name: str = "synthetic"
    vocab_size: int = 16  # source words s0..s{V-1}, target words t0..t{V-1}
    hard_words: int = 6  # s0..s{hard-1} are mistranslated as t_{i+1} ...
    hard_p_min: float = 0.55  # ... with probability rising from hard_p_min ...
    hard_p_max: float = 0.80  # ... to hard_p_max across them
    wrong_p: float = 0.1  # a random wrong word on the other words
    edit_p: float = 0.1  # a demonstration drops or duplicates one token
    train_min_len: int = 4
    train_max_len: int = 6
    heldout_min_len: int = 5  # the held-out shift that plays HH-RLHF's role
    heldout_max_len: int = 7
    n_sft: int = 20000
    # below: not read by SFT (not in its key; the pairs' key holds those read_by pairs)
    n_pref_prompts: int = read_by("pairs", "po", default=4000)  # also PPO's prompt pool
    sample_temperature: float = read_by("pairs", "po", default=1.0)  # SFT samples that form the pairs
    label_scale: float = read_by("pairs", "po", default=0.2)  # P(a > b) = sigmoid((r_a - r_b) / label_scale)
    label_flip_p: float = read_by("pairs", "po", default=0.1)  # annotator noise on top of Bradley-Terry
    n_heldout: int = read_by("eval", "analysis", default=500)
    max_new_tokens: int = read_by("pairs", "po", "eval", "analysis", default=12)


@dataclass
class SourceConfig:
    """Where one data set comes from: a local file/dir (`path`) wins over the hub (`hub_id`)."""

    hub_id: Optional[str] = None
    split: str = "train"
    data_dir: Optional[str] = None  # hub sub-folder, e.g. HH-RLHF's "helpful-base"
    path: Optional[str] = None  # .json / .jsonl / .jsonl.gz / .parquet file, or a folder of them
    max_rows: Optional[int] = None
    rows: Optional[int] = None  # the data set's known size (rows of `split`): the dry-run plan's step counts


@dataclass
class PaperDataConfig:
    """The paper's data sets (DESIGN 2): UltraChat (SFT), UltraFeedback (pairs), HH-RLHF (D'), AlpacaEval."""

    name: str = "paper"
    sft: SourceConfig = field(default_factory=SourceConfig)
    preferences: SourceConfig = read_by("pairs", "po", "analysis", default_factory=SourceConfig)
    questions: SourceConfig = read_by("analysis", default_factory=SourceConfig)  # D' (held out)
    instructions: SourceConfig = read_by("eval", default_factory=SourceConfig)
    on_invalid: OnInvalid = OnInvalid.skip
    max_length: int = 1024  # tokens after the chat template: longer training rows are truncated (as TRL does)
    max_new_tokens: int = read_by("eval", "analysis", default=512)  # AlpacaEval protocol
    num_proc: Optional[int] = how(default=None)  # processes validating rows (None: min(8, cores)); rank 0 alone


DATA_SCHEMAS = (SyntheticDataConfig, PaperDataConfig)  # a data section's schema, by its `name`


# --------------------------------------------------------------------------------------------- the rest


@dataclass
class RewardModelJudgeConfig:
    path: Optional[str] = None  # hub id or folder of an AutoModelForSequenceClassification reward model
    trust_remote_code: bool = False  # only for RMs this project cannot build (ArmoRM is built natively)
    dtype: str = "float32"
    batch_size: int = 16


@dataclass
class AlpacaEvalConfig:
    """AlpacaEval's protocol (paper App. C.3): the package's annotator prompts, order randomisation and parsing."""

    annotator: str = "weighted_alpaca_eval_gpt4_turbo"  # an alpaca_eval evaluator config (name or path), or local
    local_model: Optional[str] = None  # annotator=local: the judge LLM, hub id or folder, run on this machine
    local_batch_size: int = 8
    local_dtype: str = "bfloat16"  # on GPU; the CPU decodes in float32
    length_controlled: bool = True  # LC win rate too, where alpaca_eval can fit its GLM (805 AlpacaEval instructions)


@dataclass
class EvalConfig:
    judge: Judge = Judge.auto
    # real data: alpaca_eval (App. C.3: AlpacaEval's 805 instructions) | hh_helpful (the HH-RLHF helpful questions
    # of data.questions, as the figure captions say "tested on HH-RLHF-helpfulness"); the synthetic task: ignored
    prompts: str = "alpaca_eval"
    batch_size: Optional[int] = how(default=None)  # prompts per generate call; None = the plan's (largest that fits)
    n_prompts: Optional[int] = None  # None = all held-out prompts / instructions
    max_new_tokens: Optional[int] = None  # None = data.max_new_tokens (paper: 512)
    checkpoints: str = "all"  # all (a win-rate curve, Fig. 4) | final
    n_samples: int = how(default=16)  # outputs with verdicts shown per checkpoint in W&B and the report
    reward_model: RewardModelJudgeConfig = field(default_factory=RewardModelJudgeConfig)
    alpaca_eval: AlpacaEvalConfig = field(default_factory=AlpacaEvalConfig)


class GenerationBackend(str, Enum):
    hf = "hf"
    vllm = "vllm"


@dataclass
class GenerationConfig:
    """How the win-rate outputs and D' answers are generated (PPO rollouts always use HF generate)."""

    backend: GenerationBackend = GenerationBackend.hf  # hf (in process) | vllm (a subprocess on the saved folder)
    vllm_python: Optional[str] = None  # interpreter that can `import vllm` (its own venv); None = this one
    vllm_gpu_memory_utilization: float = 0.8  # share of the GPU vLLM may take (this process keeps its context)
    vllm_tensor_parallel_size: int = 1
    vllm_timeout_s: int = 7200  # one checkpoint's generation, engine start included


@dataclass
class AnalysisConfig:
    """Gradient alignment G (Eq. 3) at every checkpoint, after training (paper App. C.2 settings).

    Every field determines the result (the analysis key: a finished run asked for other values is analysed again,
    into `analysis_<key>/`) unless marked `how`. The batch sizes are part of it: G is filtered by the IQR of the
    mini-batch gradient norms, so another batch size is another result."""

    enabled: bool = how(default=True)  # whether to analyse, not what
    n_pairs: int = 500  # DPO: pairs sampled from D; PPO: responses generated by each checkpoint (ppo_sample=fresh)
    ppo_sample: str = "fresh"  # PPO's D: fresh (n_pairs responses of theta_t) | rollout (the saved rollout batch)
    n_dprime: int = 500  # D': questions answered greedily by the final model
    dprime: str = "heldout"  # heldout (out of distribution, the paper's main figures) | train (Fig. 7b)
    dpo_batch_size: int = 4
    ppo_batch_size: int = 6
    # DPO: auto (vmap up to vmap_max_params, else ghost) | vmap (per-sequence gradients, chunk x P memory) | ghost
    # (one backward with hooks, model + g' + activations) | jvp (forward mode per layer group + ghost norms):
    # the same G up to float rounding, so `how` (as the size threshold and the vmap chunk)
    method: str = how(default="auto")
    vmap_max_params: float = how(default=2.0e7)  # auto: vmap holds chunk x P per-sequence gradients (32 x 20 M x 4 B)
    chunk: int = how(default=32)  # sequences per vmap'd backward (memory: chunk x parameters; amortises vmap)
    ppo_all_norms: bool = False  # PPO: every component's gradient norm (one ghost pass each), not TOT's only
    dtype: str = "float32"  # bfloat16 changes G beyond rounding: part of the key
    # App. A: leave out of the G figures the checkpoints whose next update increased L on the G sample
    # (checkpoints/step-N/loss_check.json); the paper applied it. A filter of the figures, not of alignment.csv
    exclude_loss_increase: bool = how(default=True)
    # G against several targets (alignment.csv's `target` column): dprime (D', the paper's; required), chosen /
    # rejected (the G sample's training y+ / y-), sft (the SFT model's greedy answers to the D' questions),
    # unrelated (each D' question with the SFT answer to another question)
    targets: list[str] = field(default_factory=lambda: list(G_TARGETS))
    n_target: int = 64  # sequences per target other than D'
    # stacked: one pass for every target (their g' held together, T x parameters) | per_target: one pass per target
    # (one g' at a time; the per-sequence statistics recomputed per target) | auto: stacked while the T g' take at
    # most a quarter of the GPU's memory (always on CPU). The same G either way
    targets_pass: str = how(default="auto")
    attribution: bool = how(default=True)  # attribution.csv: each example's share of every component's G


G_TARGETS = ("dprime", "chosen", "rejected", "sft", "unrelated")
TARGETS_PASSES = ("auto", "stacked", "per_target")
STACKED_SHARE = 0.25  # targets_pass=auto: stacked while the targets' g' take at most this share of a GPU's memory


@dataclass
class LoggerConfig:
    name: str = "wandb"
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "po-experiments"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class RuntimeConfig:
    threads: int = 0  # torch CPU threads; 0 = the cores that are free right now (every core if deterministic)
    # Bitwise-reproducible training: a CPU thread count that does not depend on the load, and torch's deterministic
    # algorithms (Trainer full_determinism: slower on GPUs). On CPU a fixed runtime.threads alone is enough.
    deterministic: bool = False
    checkpoint_every_min: float = 30.0  # SFT / reward-model builds also checkpoint this often (0: by steps only)
    precompute_ref: bool = True  # reference log-probs once before training (exact, saves a forward per step)
    dist_timeout_s: int = 14400  # multi-process jobs: how long ranks wait for each other (rank 0 may evaluate)


@dataclass
class DebugConfig:
    kill_at_step: Optional[int] = None  # SIGKILL the run after this optimizer step (tests of resume)
    kill_at_sft_step: Optional[int] = None  # the same during the SFT build
    kill_at_reward_step: Optional[int] = None  # the same while the learned reward model trains
    kill_after_analysed: Optional[int] = None  # SIGKILL the analysis after this many checkpoints (tests of resume)


@dataclass
class DeepSpeedConfig:
    """A DeepSpeed config (conf/deepspeed/) handed to every training stage through accelerate; null = none."""

    name: str = "none"  # none | zero2 | zero3
    config: Optional[dict[str, Any]] = None  # DeepSpeed's JSON config; "auto" values come from the Trainer


@dataclass
class PlanConfig:
    """The hardware a run is planned for (`dry_run=true` prints the plan; every run checks it fits). null = from
    the SLURM launcher config when one is chosen (hydra/launcher=slurm), else this machine."""

    gpus: Optional[int] = None  # processes of the job (GPUs in all; 0 = CPU only)
    gpu_memory_gb: Optional[float] = None  # memory of one GPU
    host_memory_gb: Optional[float] = None  # host memory of one node
    gpus_per_node: Optional[int] = None
    gpu_tflops: float = 312.0  # dense bf16 peak of one GPU (A100: 312, H100 SXM: 989): for time estimates only
    mfu: float = 0.35  # the share of that peak a training step reaches (time estimates only)
    headroom: float = 0.9  # plan to this share of each GPU's memory (allocator fragmentation, CUDA context)
    check: bool = True  # stop at validation when the plan does not fit (false: warn and run)
    check_steps: bool = True  # stop when a step-valued setting (t1, t2, t3, windows, save_steps) lies outside the run


@dataclass
class SFTRunConfig:
    """The SFT model PO starts from. One per model and data: every PO seed of a sweep shares it (the same reference
    for every seed's win rate), so its seed is its own, not the run's `seed`."""

    enabled: bool = True  # false: no SFT, the base model is policy and reference (Fig. 8 b, c)
    seed: int = 0  # seeds the SFT build and the embedded task's data (demonstrations, pairs, prompts)


@dataclass
class PathsConfig:
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class Config:
    model: ModelConfig = MISSING
    algo: Any = MISSING
    ablation: AblationConfig = MISSING
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # a run saved before it: none
    data: Any = MISSING
    logger: LoggerConfig = MISSING
    reward: RewardConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    deepspeed: DeepSpeedConfig = MISSING
    plan: PlanConfig = field(default_factory=PlanConfig)
    sft: SFTRunConfig = field(default_factory=SFTRunConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    name: str = "default"
    seed: int = 0
    dry_run: bool = False  # print and write the plan (plan.json), load nothing, exit 0 (fits) or 2 (does not)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, spec in OBJECTIVES.items():  # `defaults: [<name>_schema, _self_]` in conf/algo/<name>.yaml
        cs.store(group="algo", name=f"{name}_schema", node=spec.schema)
    cs.store(group="reward", name="reward_schema", node=RewardConfig)
    cs.store(group="ablation", name="ablation_schema", node=AblationConfig)
    cs.store(group="controller", name="controller_schema", node=ControllerConfig)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
    cs.store(group="data", name="paper_schema", node=PaperDataConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="deepspeed", name="deepspeed_schema", node=DeepSpeedConfig)


# A run's identity (its dir name) is its command line's overrides, minus the settings that cannot change what it
# trains: how it is analysed (analysis), evaluated (eval), generated (generation), planned (plan), executed
# (runtime, debug, dry_run), logged (logger), where it writes (paths, name) and which preset asked for it
# (experiment). A run asked for again with other values of these is the same run: a finished one is only analysed
# or judged again (pipeline.finished_run), never trained twice. A prefix covers its section (`analysis` covers
# analysis.n_pairs, +analysis.x) but not another group (`experiment/method`, `experiment/model` are identity).
# A new section of one of these kinds needs its name here; a new key inside one is covered already.
NOT_IDENTITY = ("analysis", "eval", "generation", "plan", "runtime", "debug", "dry_run", "logger", "paths", "name",
                "experiment")


def is_identity_key(key: str) -> bool:
    """Whether an override of `key` (a config key or group) can change what a run trains."""
    return not any(key == p or key.startswith(p + ".") for p in NOT_IDENTITY)


def _run_name(overrides) -> str:
    """A run dir name from the command line's task overrides (`hydra.overrides.task`): the identity overrides,
    sorted and joined as Hydra's override_dirname joins them (so run dirs named before keep their names), with
    characters unsafe in a path replaced. The same run finds the same dir (resume, or a finished run reused)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [str(o) for o in (overrides or [])]
    parsed = OverridesParser.create().parse_overrides(lines) if lines else []
    kept = sorted(o.input_line for o in parsed if is_identity_key(o.key_or_group))
    if not kept:
        return "default"
    return re.sub(r"[^A-Za-z0-9=,._+-]", "_", ",".join(kept))


if not OmegaConf.has_resolver("po_run_name"):
    OmegaConf.register_new_resolver("po_run_name", _run_name)
register_configs()


# --------------------------------------------------------------------------------------------- validation

def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _check_prob(cfg: DictConfig, key: str) -> None:
    v = OmegaConf.select(cfg, key)
    _require(0.0 <= v <= 1.0, key, f"must be a probability in [0, 1], got {v}")


def _check_stage(cfg: DictConfig, key: str) -> None:
    s = OmegaConf.select(cfg, key)
    _require(s.batch_size > 0, f"{key}.batch_size", f"must be > 0, got {s.batch_size}")
    _require(s.learning_rate > 0, f"{key}.learning_rate", f"must be > 0, got {s.learning_rate}")
    _require(s.epochs > 0 or s.max_steps > 0, f"{key}.epochs", "must be > 0 unless max_steps is set")
    _require(s.save_steps >= 0, f"{key}.save_steps", f"must be >= 0, got {s.save_steps}")
    _require(0.0 <= s.warmup_ratio < 1.0, f"{key}.warmup_ratio", f"must be in [0, 1), got {s.warmup_ratio}")
    pd = s.per_device_batch_size
    if pd is not None:
        _require(pd > 0 and s.batch_size % pd == 0, f"{key}.per_device_batch_size",
                 f"must divide {key}.batch_size={s.batch_size}, got {pd}")


def _check_components(values, key: str, algo) -> None:
    known = components_of(algo)
    for c in values:
        _require(c in known, key, f"unknown component {c!r}; choose from {', '.join(known)}")


def validate(cfg: DictConfig) -> None:
    """Range and cross-field checks; raises ConfigError naming the offending key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        _validate(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation to a value the model config leaves unset
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def _validate_algo(cfg: DictConfig) -> None:
    """The objective is registered, of the family its section says, and its schema's range checks pass."""
    _require(cfg.algo.name in OBJECTIVES, "algo.name",
             f"unknown objective {cfg.algo.name!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    spec = objective_of(cfg.algo)
    _require(cfg.algo.family == spec.family, "algo.family",
             f"objective {spec.name!r} is of family {spec.family!r}, got {cfg.algo.family!r}")
    for key, message in spec.schema.problems(cfg.algo):
        _require(False, f"algo.{key}", message)


def _validate_dpo(cfg: DictConfig) -> None:
    _check_stage(cfg, "model.dpo")
    dpo = cfg.model.dpo
    if dpo.save_steps:
        _require(dpo.save_steps % dpo.logging_steps == 0, "model.dpo.logging_steps",
                 f"must divide model.dpo.save_steps={dpo.save_steps} (each checkpoint records the loss logged at "
                 f"its step), got {dpo.logging_steps}")


def _validate_ppo(cfg: DictConfig) -> None:
    _check_stage(cfg, "model.ppo")
    p = cfg.model.ppo
    _require(p.temperature > 0, "model.ppo.temperature", f"must be > 0, got {p.temperature}")
    _require(0 < p.top_p <= 1, "model.ppo.top_p", f"must be in (0, 1], got {p.top_p}")
    _require(p.max_new_tokens > 0, "model.ppo.max_new_tokens", f"must be > 0, got {p.max_new_tokens}")
    _require(p.generation_batch_size is None or p.generation_batch_size > 0, "model.ppo.generation_batch_size",
             f"must be > 0 or null (the whole per-device rollout batch), got {p.generation_batch_size}")
    r = cfg.reward
    _require(r.kind in ("gold", "learned", "classifier"), "reward.kind",
             f"must be gold, learned or classifier, got {r.kind!r}")
    if r.kind in ("gold", "learned"):
        _require(cfg.data.name == "synthetic", "reward.kind",
                 f"reward.kind={r.kind} exists only for the synthetic task; use a classifier reward model")
    else:
        _require(r.path is not None, "reward.path", "a classifier reward needs a hub id or local directory")


EVAL_PROMPTS = ("alpaca_eval", "hh_helpful")


def _validate_eval(e: DictConfig) -> None:
    for key in ("batch_size", "n_prompts", "max_new_tokens", "reward_model.batch_size", "alpaca_eval.local_batch_size"):
        value = OmegaConf.select(e, key)
        _require(value is None or value > 0, f"eval.{key}", f"must be > 0, got {value}")
    _require(e.n_samples >= 0, "eval.n_samples", f"must be >= 0, got {e.n_samples}")
    _require(e.checkpoints in ("all", "final"), "eval.checkpoints", f"must be all or final, got {e.checkpoints!r}")
    _require(e.prompts in EVAL_PROMPTS, "eval.prompts", f"must be {' or '.join(EVAL_PROMPTS)}, got {e.prompts!r}")
    if e.judge == Judge.reward_model:
        _require(e.reward_model.path is not None, "eval.reward_model.path",
                 "eval.judge=reward_model needs a reward model: a hub id or a local folder")
    if e.judge == Judge.alpaca_eval and e.alpaca_eval.annotator == "local":
        _require(e.alpaca_eval.local_model is not None, "eval.alpaca_eval.local_model",
                 "eval.alpaca_eval.annotator=local needs a judge model: a hub id or a local folder")
    for key in ("reward_model.dtype", "alpaca_eval.local_dtype"):
        value = OmegaConf.select(e, key)
        _require(value in ("float32", "bfloat16", "float16"), f"eval.{key}",
                 f"must be float32, bfloat16 or float16, got {value!r}")


def _validate_controller(cfg: DictConfig) -> None:
    """The controller is registered, its settings in range, and the objective has a lambda it can set."""
    from .controllers import CONTROLLERS, controllable

    c = cfg.get("controller")
    if c is None or c.name == "none":
        return
    _require(c.name in CONTROLLERS, "controller.name",
             f"unknown controller {c.name!r}; registered: {', '.join(sorted(CONTROLLERS))}")
    for key in ("every", "n_questions", "refresh", "max_new_tokens"):
        _require(c[key] >= 1, f"controller.{key}", f"must be >= 1, got {c[key]}")
    for key in ("lambda_init", "lambda_max"):
        _require(0.0 <= c[key] <= 1.0, f"controller.{key}", f"must be in [0, 1], got {c[key]}")
    _require(c.lambda_init <= c.lambda_max, "controller.lambda_init",
             f"must be <= controller.lambda_max ({c.lambda_max}), got {c.lambda_init}")
    _require(0.0 < c.ramp <= 1.0, "controller.ramp", f"must be in (0, 1], got {c.ramp}")
    _require(0.0 < c.smoothing <= 1.0, "controller.smoothing", f"must be in (0, 1], got {c.smoothing}")
    reason = controllable(cfg.algo)
    _require(reason is None, "controller.name", f"controller={c.name} with algo={cfg.algo.name}: {reason}")
    zero = (cfg.deepspeed.config or {}).get("zero_optimization") or {}
    _require(zero.get("stage") != 3, "controller.name",
             f"controller={c.name} takes whole-parameter gradients (torch.autograd.grad); ZeRO-3 partitions them: "
             "use deepspeed=none or zero2")


def _validate(cfg: DictConfig) -> None:
    from .trainers.ablations import ABLATIONS  # registry, imported late to keep config import light

    _validate_algo(cfg)
    _require(len(cfg.algo.components) > 0, "algo.components", "must name at least one component")
    _check_components(cfg.algo.components, "algo.components", cfg.algo)
    {"dpo": _validate_dpo, "ppo": _validate_ppo}[cfg.algo.family](cfg)  # the family's training settings

    _require(cfg.ablation.name in ABLATIONS, "ablation.name",
             f"unknown ablation {cfg.ablation.name!r}; registered: {', '.join(sorted(ABLATIONS))}")
    _check_components(cfg.ablation.drop, "ablation.drop", cfg.algo)
    _require(cfg.ablation.start_step >= 0, "ablation.start_step", f"must be >= 0, got {cfg.ablation.start_step}")
    if cfg.ablation.stop_step is not None:
        _require(cfg.ablation.stop_step > cfg.ablation.start_step, "ablation.stop_step",
                 f"must be > ablation.start_step ({cfg.ablation.start_step}), got {cfg.ablation.stop_step}")

    _validate_controller(cfg)

    _check_stage(cfg, "model.sft")
    _require(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
             f"must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    _require(cfg.model.path is not None or cfg.model.arch is not None, "model.path",
             "set a hub id or local directory (or model.arch for a model built from scratch)")
    _require(cfg.model.max_length > 0, "model.max_length", f"must be > 0, got {cfg.model.max_length}")
    for key, value in (cfg.model.get("chat_template_kwargs") or {}).items():
        _require(str(key).isidentifier() and isinstance(value, (bool, int, float, str)),
                 f"model.chat_template_kwargs.{key}", f"must name a template variable and hold a boolean, number or "
                 f"string, got {value!r}")

    if cfg.data.name == "synthetic":
        for key in ("hard_p_min", "hard_p_max", "wrong_p", "edit_p", "label_flip_p"):
            _check_prob(cfg, f"data.{key}")
        d = cfg.data
        _require(0 <= d.hard_words <= d.vocab_size, "data.hard_words", f"must be in [0, vocab_size], got {d.hard_words}")
        _require(1 <= d.train_min_len <= d.train_max_len, "data.train_max_len", "need 1 <= train_min_len <= train_max_len")
        _require(1 <= d.heldout_min_len <= d.heldout_max_len, "data.heldout_max_len",
                 "need 1 <= heldout_min_len <= heldout_max_len")
        for key in ("n_sft", "n_pref_prompts", "n_heldout", "max_new_tokens"):
            _require(d[key] > 0, f"data.{key}", f"must be > 0, got {d[key]}")
        _require(d.label_scale > 0, "data.label_scale", f"must be > 0, got {d.label_scale}")
        _require(d.sample_temperature > 0, "data.sample_temperature", f"must be > 0, got {d.sample_temperature}")
    else:
        _require(cfg.data.num_proc is None or cfg.data.num_proc > 0, "data.num_proc",
                 f"must be > 0 (or null for min(8, cores)), got {cfg.data.num_proc}")
        _require(cfg.eval.judge != Judge.gold, "eval.judge",
                 "the gold judge exists only for the synthetic task; use alpaca_eval, reward_model or none")
    _validate_eval(cfg.eval)
    an = cfg.analysis
    _require(an.dprime in ("heldout", "train"), "analysis.dprime", f"must be heldout or train, got {an.dprime!r}")
    _require(an.method in ("auto", "vmap", "ghost", "jvp"), "analysis.method",
             f"must be auto, vmap, ghost or jvp, got {an.method!r}")
    _require(an.ppo_sample in ("fresh", "rollout"), "analysis.ppo_sample",
             f"must be fresh (n_pairs responses of each checkpoint) or rollout (the saved rollout batch), "
             f"got {an.ppo_sample!r}")
    _require(an.vmap_max_params >= 0, "analysis.vmap_max_params", f"must be >= 0, got {an.vmap_max_params}")
    for key in ("n_pairs", "n_dprime", "dpo_batch_size", "ppo_batch_size", "chunk"):
        _require(an[key] > 0, f"analysis.{key}", f"must be > 0, got {an[key]}")
    _require(an.dtype in ("float32", "bfloat16"), "analysis.dtype",
             f"must be float32 or bfloat16 (eager attention needs it), got {an.dtype!r}")
    _validate_targets(an)
    _require(cfg.runtime.threads >= 0, "runtime.threads", f"must be >= 0 (0 = auto), got {cfg.runtime.threads}")
    _require(cfg.logger.mode in ("offline", "online", "disabled"), "logger.mode",
             f"must be offline, online or disabled, got {cfg.logger.mode!r}")
    zero = (cfg.deepspeed.config or {}).get("zero_optimization") or {}
    _require(not (cfg.algo.family == "ppo" and zero.get("stage") == 3
                  and not zero.get("stage3_gather_16bit_weights_on_model_save")),
             "deepspeed.config.zero_optimization.stage3_gather_16bit_weights_on_model_save",
             "must be true for the PPO family under ZeRO-3 (its checkpoints hold the whole policy and value model)")
    _require(cfg.runtime.checkpoint_every_min >= 0, "runtime.checkpoint_every_min",
             f"must be >= 0 (0 = by steps only), got {cfg.runtime.checkpoint_every_min}")
    _require(cfg.reward.train.save_steps >= 0, "reward.train.save_steps",
             f"must be >= 0, got {cfg.reward.train.save_steps}")
    for key in ("kill_at_step", "kill_at_sft_step", "kill_at_reward_step"):
        if cfg.debug[key] is not None:
            _require(cfg.debug[key] > 0, f"debug.{key}", f"must be > 0, got {cfg.debug[key]}")


def _validate_targets(an) -> None:
    targets = list(an.targets)
    unknown = [t for t in targets if t not in G_TARGETS]
    _require(not unknown, "analysis.targets", f"unknown target(s) {unknown}; choose from {', '.join(G_TARGETS)}")
    _require("dprime" in targets, "analysis.targets", f"must include dprime (the paper's D'), got {targets}")
    _require(len(set(targets)) == len(targets), "analysis.targets", f"names a target twice: {targets}")
    _require(an.n_target > 0, "analysis.n_target", f"must be > 0, got {an.n_target}")
    _require(an.targets_pass in TARGETS_PASSES, "analysis.targets_pass",
             f"must be one of {', '.join(TARGETS_PASSES)}, got {an.targets_pass!r}")


def run_config(run_dir, overrides=()) -> DictConfig:
    """An existing run dir's resolved config (`.hydra/config.yaml`) with key=value overrides, for the scripts
    that work on a finished run (analysis, another judge) outside a Hydra job."""
    import json
    import os
    from pathlib import Path

    run_dir = Path(run_dir).resolve()
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(list(overrides)))
    cfg.paths.output_dir = str(run_dir)  # the saved config keeps ${hydra:...} paths, resolvable only in a job
    summary = run_dir / "summary.json"
    sft = json.loads(summary.read_text()).get("sft_dir") if summary.exists() else None
    cfg.paths.cache_dir = os.environ.get("PO_CACHE_DIR") or (str(Path(sft).parents[1]) if sft else "outputs/cache")
    validate(cfg)
    return cfg
