"""Across runs: Table 1 and the ablation figures from a sweep's run dirs, and the report a person opens."""
