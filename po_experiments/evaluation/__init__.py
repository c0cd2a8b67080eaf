"""Evaluation: greedy outputs at every checkpoint, judged pairwise against the SFT model (paper App. C.3)."""
