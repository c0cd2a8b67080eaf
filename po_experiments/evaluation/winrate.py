"""Win rate as AlpacaEval defines it, on AlpacaEval's preference encoding.

A verdict's `preference` is 1 (the reference, output_1, wins), 2 (the candidate, output_2, wins), 1.5 (a tie),
anything in between (a weighted judge's probability, 1 + P(candidate)), 0 (alpaca_eval's legacy tie), or NaN
(the judge's answer did not parse; dropped, as alpaca_eval drops it). The win rate is the mean of
`preference - 1` in percent, so a tie counts one half; its standard error is the sample standard deviation
(ddof 1) over sqrt(n), in percent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class WinRate:
    win_rate: float  # percent
    standard_error: float  # percent; NaN for fewer than two verdicts
    n: int  # verdicts counted
    n_wins: int
    n_draws: int
    n_dropped: int  # unparsed verdicts


def scores(preferences: Iterable[Optional[float]]) -> tuple[list[float], int]:
    """Each verdict as the candidate's share in [0, 1], and how many were dropped."""
    kept, dropped = [], 0
    for p in preferences:
        if p is None or (isinstance(p, float) and math.isnan(p)):
            dropped += 1
            continue
        p = 1.5 if p == 0 else float(p)
        if not 1.0 <= p <= 2.0:
            raise ValueError(f"preference {p} is not in AlpacaEval's encoding (1, 2, 1.5 for a tie, 0 legacy tie)")
        kept.append(p - 1.0)
    return kept, dropped


def win_rate(preferences: Iterable[Optional[float]]) -> WinRate:
    kept, dropped = scores(preferences)
    n = len(kept)
    if n == 0:
        return WinRate(math.nan, math.nan, 0, 0, 0, dropped)
    mean = sum(kept) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in kept) / (n - 1) / n) if n > 1 else math.nan
    return WinRate(100.0 * mean, 100.0 * se, n, sum(s > 0.5 for s in kept), sum(s == 0.5 for s in kept), dropped)
