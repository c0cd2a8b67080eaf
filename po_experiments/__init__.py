"""po-experiments: the paper's DPO/PPO component analyses as a Hydra-configured pipeline (see README.md)."""
import os

# TRL warns on every import of trl.experimental; we pin TRL 1.12 precisely for that API (its last with PPO)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
