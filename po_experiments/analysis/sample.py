"""The fixed sample of D every DPO-family measurement uses: G (analysis stage) and App. A's loss check (training).

One function selects it, so both see exactly the same `analysis.n_pairs` training pairs (seeded by the run's seed).
"""
from __future__ import annotations

import torch


def pair_sample_indices(cfg, n_total: int) -> list[int]:
    """Positions of the sample among the `n_total` training pairs: a seeded permutation's first `analysis.n_pairs`."""
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.analysis.n_pairs]
    return order.tolist()


def select_pair_sample(cfg, pairs):
    """The sample as a `datasets.Dataset` of the training pairs (`preference_data`'s rows)."""
    return pairs.select(pair_sample_indices(cfg, len(pairs)))
