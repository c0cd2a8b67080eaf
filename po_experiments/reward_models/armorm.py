"""ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1), the paper's reward model for Pythia and Qwen3, without remote code.

The published checkpoint ships its own modeling file, which transformers 5 cannot import. This is a native
transformers model over the same state-dict keys, so the published weights load strictly (nothing missing,
nothing left over):
- `model`: a LlamaModel backbone;
- `regression_layer`: Linear(hidden -> n_objectives, no bias), read at the last real token: one reward per
  objective (helpfulness, correctness, verbosity, ...);
- `reward_transform_matrix` [n, n]: a fixed linear map of those rewards (it reduces verbosity bias), loaded;
- `gating`: an MLP hidden -> d -> ... -> n (ReLU between layers) read at the end of the prompt, i.e. at the start
  of the last `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`; softmax(x / T) times a learned
  `logit_scale` gives the prompt-dependent weight of each objective.
score = sum_k gating_k * (rewards @ reward_transform_matrix)_k.

Sizes come from config keys with the published defaults (`num_objectives` 19, `gating_hidden_dim` 1024,
`gating_n_hidden` 3, `gating_temperature` 10), so a tiny test checkpoint can be smaller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.utils import ModelOutput

from ..errors import ModelUnavailableError

ARCHITECTURE = "LlamaForRewardModelWithGating"  # config.architectures of the published checkpoint
# The end of the prompt in Llama-3's chat format; the gating network reads the hidden state where it starts.
GATING_PATTERN_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
PUBLISHED_GATING_PATTERN = (128009, 128006, 78191, 128007, 271)  # its ids in Llama-3's vocabulary
DEFAULTS = {"num_objectives": 19, "gating_hidden_dim": 1024, "gating_n_hidden": 3, "gating_temperature": 10.0}


def config_value(config, key: str):
    value = getattr(config, key, None)
    return DEFAULTS[key] if value is None else value


@dataclass
class ArmoRMOutput(ModelOutput):
    score: Optional[torch.Tensor] = None  # [B] the preference score (the reward PPO and the judge use)
    rewards: Optional[torch.Tensor] = None  # [B, n_objectives] per-objective rewards before the transform
    gating_output: Optional[torch.Tensor] = None  # [B, n_objectives] the prompt's weight of each objective


class GatingNetwork(nn.Module):
    """Prompt hidden state -> weights over the objectives: an MLP, softmax at a temperature, a learned scale."""

    def __init__(self, in_features: int, n_objectives: int, hidden_dim: int, n_hidden: int, temperature: float):
        super().__init__()
        sizes = [in_features] + [hidden_dim] * n_hidden + [n_objectives]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return F.softmax(self.layers[-1](x) / self.temperature, dim=-1) * self.logit_scale


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token (right padding: the sequence's last token)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=1)


def gating_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, pattern: Sequence[int]) -> torch.Tensor:
    """Per row, where the LAST occurrence of `pattern` (the prompt's end) starts among the real tokens."""
    n = len(pattern)
    batch, width = input_ids.shape
    if width < n:
        found = torch.zeros(batch, 0, dtype=torch.bool, device=input_ids.device)
    else:
        windows = input_ids.unfold(1, n, 1)  # [B, width - n + 1, n]
        target = torch.tensor(list(pattern), device=input_ids.device)
        found = (windows == target).all(-1) & attention_mask.bool().unfold(1, n, 1).all(-1)
    missing = [row for row in range(batch) if not found[row].any()] if found.shape[1] else list(range(batch))
    if missing:
        raise ValueError(
            f"ArmoRM: row(s) {missing[:10]} of the batch have no end-of-prompt pattern {list(pattern)} "
            f"({GATING_PATTERN_TEXT!r}); ArmoRM reads a conversation in its own (Llama-3) chat template with a "
            "user turn followed by an assistant turn")
    starts = torch.arange(found.shape[1], device=input_ids.device)
    return (starts * found).argmax(dim=1)


class ArmoRMForScoring(LlamaPreTrainedModel):
    """A Llama backbone with ArmoRM's regression head, reward transform and gating network (see module doc)."""

    def __init__(self, config):
        super().__init__(config)
        n = int(config_value(config, "num_objectives"))
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, n, bias=False)
        # loaded from the checkpoint; a frozen parameter rather than a buffer, as in the published state dict
        self.reward_transform_matrix = nn.Parameter(torch.eye(n), requires_grad=False)
        self.gating = GatingNetwork(config.hidden_size, n, int(config_value(config, "gating_hidden_dim")),
                                    int(config_value(config, "gating_n_hidden")),
                                    float(config_value(config, "gating_temperature")))
        self.post_init()

    @property
    def gating_pattern(self) -> tuple[int, ...]:
        return tuple(getattr(self.config, "gating_token_pattern", None) or PUBLISHED_GATING_PATTERN)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> ArmoRMOutput:
        if attention_mask is None:  # no mask: every token that is not the pad id is real
            pad = self.config.pad_token_id
            attention_mask = torch.ones_like(input_ids) if pad is None else (input_ids != pad).long()
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=hidden.device)
        head = self.regression_layer.weight.device  # the heads may sit on another GPU than the last layer
        response_end = hidden[rows, last_real_positions(attention_mask).to(hidden.device)].to(head)
        prompt_end = hidden[rows, gating_positions(input_ids, attention_mask, self.gating_pattern).to(hidden.device)]
        rewards = self.regression_layer(response_end)
        gating = self.gating(prompt_end.to(head))
        adjusted = rewards.float() @ self.reward_transform_matrix.float()  # float32: bf16 would round the sum
        score = (gating.float() * adjusted).sum(dim=-1)
        return ArmoRMOutput(score=score, rewards=rewards, gating_output=gating)


def gating_pattern_ids(tokenizer) -> list[int]:
    """The end-of-prompt pattern in this tokenizer's ids (Llama-3's: the published ids)."""
    specials = ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
    unknown = [t for t in specials if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if unknown:
        raise ModelUnavailableError(f"ArmoRM's tokenizer has no {', '.join(unknown)}: it is not a Llama-3 chat "
                                    "tokenizer, so the end of the prompt cannot be found")
    return tokenizer(GATING_PATTERN_TEXT, add_special_tokens=False)["input_ids"]


def load_armorm(source: str, tokenizer, *, dtype: torch.dtype = torch.float32, key: str = "reward.path"):
    """ArmoRM from `source` (a folder or hub id), loaded strictly: a missing, unexpected or mis-shaped key is an
    error naming it, never a silently re-initialised head."""
    # mis-shaped keys are reported (then refused below) rather than raised without their names
    model, info = ArmoRMForScoring.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                   ignore_mismatched_sizes=True)
    problems = [f"{what} keys: {sorted(str(k[0]) if isinstance(k, tuple) else k for k in info[field])}"
                for field, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                                    ("mismatched_keys", "mis-shaped"))
                if info.get(field)]
    if problems:
        raise ModelUnavailableError(f"{key}={source}: not ArmoRM's published layout ({'; '.join(problems)})")
    model.config.gating_token_pattern = gating_pattern_ids(tokenizer)
    return model
