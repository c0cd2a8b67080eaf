"""Decide quickly whether the Hugging Face Hub can be used, so offline runs fail in seconds, not minutes."""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

HUB_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_by_env() -> bool:
    """True when the user told the HF libraries to stay offline."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in {"1", "true", "yes", "on"} for f in flags)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint; DNS failure or refusal answers False within `timeout`."""
    if offline_by_env():
        return False
    url = urlparse(HUB_ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
