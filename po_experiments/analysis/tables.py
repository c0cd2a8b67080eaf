"""Reading a run's G table (alignment.csv). Since G is measured against several targets (`target` column:
dprime = the paper's D', and others), every consumer of the paper's G takes the D' rows through `paper_target`;
tables written before the column existed hold D' only and pass through unchanged."""
from __future__ import annotations

import pandas as pd

PAPER_TARGET = "dprime"


def paper_target(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of G against the paper's D' (all rows of a table without a `target` column)."""
    if "target" not in table.columns:
        return table
    return table[table["target"].fillna(PAPER_TARGET) == PAPER_TARGET].reset_index(drop=True)
