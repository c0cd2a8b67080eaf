"""G (Eq. 3) for the DPO family under DeepSpeed ZeRO-3: the numbers of `gradients.dpo_alignment`, from shards.

Under ZeRO-3 each process holds 1/N of every parameter and, after a backward, 1/N of its gradient; nothing is
ever gathered whole. A dot product of two gradients is the sum over ranks of the dot products of their local
partitions, so every G and gradient norm is a local sum followed by one all-reduce. Every forward/backward is
collective (ZeRO-3 gathers each layer's weights for it), so all ranks make the same calls: the sequences of a
call are split between the ranks, a rank with nothing left takes a dummy row with coefficient 0.

Per mini-batch and component c, one collective backward of sum_i c_i log pi(y_i) leaves each rank its
partition of grad L_c (DeepSpeed averages over ranks, so each rank's share of the loss is scaled by N), from
which G_c per layer group and ||grad L_c||^2 are local sums. Components with no weight in a mini-batch cost
nothing. g' = E_D'[-grad log pi(y'|x')] is accumulated the same way, partition by partition.

Several targets (`analysis.targets`): each target's g'_t is accumulated so (its partition on each rank), and every
component's local gradient is dotted with all of them, so targets add dot products, not backwards. Per-example
attribution needs per-sequence dots, which this path does not form: the stage skips it here (logged).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from .. import distributed
from ..models import DTYPES
from .gradients import MinibatchAlignment, dpo_coefficients, layer_group

def uses_sharded_analysis(cfg) -> bool:
    """G is computed from ZeRO-3 shards when the run trains under ZeRO-3 (DPO family)."""
    stage = ((cfg.deepspeed.config or {}).get("zero_optimization") or {}).get("stage")
    return cfg.algo.family == "dpo" and stage == 3


def analysis_ds_config(cfg) -> dict:
    """The run's ZeRO-3 settings with explicit batch sizes (no Trainer fills "auto" here) and no optimizer step."""
    from omegaconf import OmegaConf

    zero = OmegaConf.to_container(cfg.deepspeed.config.zero_optimization, resolve=True)
    zero = {k: v for k, v in zero.items() if v != "auto"}
    bf16 = cfg.analysis.dtype == "bfloat16" and torch.cuda.is_available()
    return {"zero_optimization": {**zero, "stage": 3}, "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1, "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2 ** 31 - 1}


class ShardedModel:
    """A saved model partitioned over the job's processes by ZeRO-3 as it loads, with an optimizer that is never
    stepped (SGD, lr 0): DeepSpeed then leaves each rank the partition of every gradient it computes."""

    def __init__(self, folder: Path, cfg):
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        config = analysis_ds_config(cfg)
        hf_config = HfDeepSpeedConfig(config)  # noqa: F841  (while alive, from_pretrained loads partitioned)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[cfg.analysis.dtype],
                                                     attn_implementation="eager")
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                               config=config)
        unset_hf_deepspeed_config()  # later loads (evaluation, other stages) are whole again
        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.groups = [layer_group(n, model.config.num_hidden_layers) for n, _ in named]
        self.device = self.engine.device
        self.world, self.rank = distributed.world(), distributed.rank()

    def close(self) -> None:
        self.engine.destroy()

    # --------------------------------------------------------------------------------------- primitives
    def _share(self, n_rows: int, per_rank: int, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of collective call `call` (row indices, and which of them are real)."""
        start = call * per_rank * self.world + self.rank * per_rank
        idx = torch.arange(start, start + per_rank)
        return idx.clamp(max=n_rows - 1), idx < n_rows

    def _logps(self, ids, mask, comp) -> torch.Tensor:
        ids, mask, comp = ids.to(self.device), mask.to(self.device), comp.to(self.device)
        logits = self.engine(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (token * comp[:, 1:]).sum(1)

    def _local_gradient(self, loss: torch.Tensor) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_local_grad

        self.engine.backward(loss)
        grads = [safe_get_local_grad(p).detach().clone() for p in self.params]
        self.engine.optimizer.zero_grad()
        return grads

    # --------------------------------------------------------------------------------------- passes
    @torch.no_grad()
    def sequence_logps(self, ids, mask, comp, per_rank: int = 16) -> torch.Tensor:
        """Completion log-prob of every row, on every rank."""
        n, chunk = len(ids), per_rank * self.world
        out = []
        for call in range(math.ceil(n / chunk)):
            idx, _ = self._share(n, per_rank, call)
            lp = self._logps(ids[idx], mask[idx], comp[idx]).double()
            parts = [torch.empty_like(lp) for _ in range(self.world)]
            dist.all_gather(parts, lp)  # rank r's rows follow rank r-1's: the call's rows in order
            out.append(torch.cat(parts).cpu())
        return torch.cat(out)[:n]

    def dprime_gradient(self, batches) -> list[torch.Tensor]:
        """Local partitions of g' = E_D'[-grad log pi(y'|x')] (mean over every D' sequence)."""
        return self.target_gradient(batches)[0]

    def target_gradient(self, batches) -> tuple[list[torch.Tensor], float]:
        """Local partitions of g'_t = E_t[-grad log pi(y|x)] (mean over the target's sequences) and the target's
        mean log-likelihood (on every rank)."""
        total = sum(len(b[0]) for b in batches)
        acc, logp = None, torch.zeros((), dtype=torch.float64, device=self.device)
        for ids, mask, comp in batches:
            per_rank = math.ceil(len(ids) / self.world)
            idx, real = self._share(len(ids), per_rank, 0)
            lp = self._logps(ids[idx], mask[idx], comp[idx])
            logp += (lp.detach().double() * real.to(lp.device)).sum()
            grads = self._local_gradient(-(lp * real.to(lp.device)).sum() * (self.world / total))
            acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
        dist.all_reduce(logp)
        return acc, logp.item() / total

    def component_stats(self, ids, mask, comp, coef: torch.Tensor, dprime: list) -> torch.Tensor:
        """This rank's partial [component, target, (g'_bottom, g'_middle, g'_top) . grad L_c, ||grad L_c||^2] for
        one mini-batch; `coef` [components, rows] are the coefficients of grad log pi(row) in grad L_c; `dprime`:
        one target's partitions, or a list of them (one per target)."""
        targets = dprime if isinstance(dprime[0], (list, tuple)) else [dprime]
        out = torch.zeros(len(coef), len(targets), 4, dtype=torch.float64, device=self.device)
        per_rank = math.ceil(len(ids) / self.world)
        idx, real = self._share(len(ids), per_rank, 0)
        for c, weights in enumerate(coef):
            if not weights.any():  # the same on every rank: nobody waits
                continue
            w = (weights[idx] * real).to(self.device, torch.float32)
            grads = self._local_gradient((w * self._logps(ids[idx], mask[idx], comp[idx])).sum() * self.world)
            for j, (g, k) in enumerate(zip(grads, self.groups)):
                flat = g.flatten().double()
                for t, target in enumerate(targets):
                    out[c, t, k] += torch.dot(flat, target[j].flatten().double())
                out[c, :, 3] += flat.pow(2).sum()
        return out if isinstance(dprime[0], (list, tuple)) else out[:, 0]


def sharded_dpo_alignment(folder: Path, cfg, pairs: dict, ref_logps, dprime_batches, step: int,
                          progress=None) -> MinibatchAlignment:
    """`gradients.dpo_alignment` for a checkpoint folder, under ZeRO-3 on every rank of the job. `dprime_batches`:
    D' mini-batches, or {target: mini-batches} with D' first (G per target; no per-example shares)."""
    targets = dprime_batches if isinstance(dprime_batches, dict) else {"dprime": dprime_batches}
    model = ShardedModel(folder, cfg)
    try:
        local = {t: model.target_gradient(b) for t, b in targets.items()}
        dprime = [g for g, _ in local.values()]
        n = len(pairs["chosen_ids"])
        lp = [model.sequence_logps(pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
              for s in ("chosen", "rejected")]
        coef = dpo_coefficients(*lp, *(r.double().cpu() for r in ref_logps), cfg.algo, step,
                                chosen_completion=pairs["chosen_comp"][:, 1:],
                                rejected_completion=pairs["rejected_comp"][:, 1:], chosen_ids=pairs["chosen_ids"][:, 1:])
        components = tuple(coef)
        size = cfg.analysis.dpo_batch_size
        starts = range(0, n, size)
        partial = []
        for s in (progress(starts) if progress else starts):
            idx = torch.arange(s, min(s + size, n))
            rows = {k: torch.cat([pairs[f"chosen_{k}"][idx], pairs[f"rejected_{k}"][idx]]) for k in ("ids", "mask", "comp")}
            C = torch.stack([torch.cat([coef[c][idx], coef[c][n + idx]]) for c in components]) / len(idx)
            partial.append(model.component_stats(rows["ids"], rows["mask"], rows["comp"], C, dprime))
        stats = torch.stack(partial)  # batches x components x targets x 4
        dist.all_reduce(stats)  # local partitions -> whole dot products and squared norms
        stats = stats.cpu()
        G = torch.cat([stats[..., :3].sum(-1, keepdim=True), stats[..., :3]], dim=-1).transpose(1, 2)
        return MinibatchAlignment(components, G[:, 0], stats[:, :, 0, 3].clamp(min=0).sqrt(), tuple(targets), G,
                                  target_logp={t: lp for t, (_, lp) in local.items()})
    finally:
        model.close()


def sharded_reference_logps(sft_dir: Path, cfg, pairs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (SFT) log-probs of the sampled pairs, with the SFT model partitioned the same way."""
    model = ShardedModel(sft_dir, cfg)
    try:
        return tuple(model.sequence_logps(pairs[f"{s}_ids"], pairs[f"{s}_mask"], pairs[f"{s}_comp"])
                     for s in ("chosen", "rejected"))
    finally:
        model.close()
