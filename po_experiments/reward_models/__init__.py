"""Reward-model architectures this project builds itself (no remote code), and the config.json checks that tell,
without loading weights, whether a reward or judge checkpoint can be built here."""
