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


def resolve_pretrained(path: str, key: str, hint: str) -> str:
    """A local folder with config.json, or a hub id that is cached or reachable; otherwise ModelUnavailableError
    within seconds, naming the config key (`key`) and saying how to point at a local copy (`hint`)."""
    from pathlib import Path

    from .errors import ModelUnavailableError

    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelUnavailableError(f"{key}={path} exists but has no config.json. {hint}")
        return str(local)
    if path.startswith(("/", ".", "~")):
        raise ModelUnavailableError(f"{key}={path}: no such directory. {hint}")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return path  # in the local HF cache: loads offline
    except Exception:  # an odd cache layout is no reason to fail here; the reachability check decides
        pass
    if not hub_reachable():
        raise ModelUnavailableError(f"{key}={path!r} is not in the local Hugging Face cache and the Hub cannot be "
                                    f"reached (offline or HF_HUB_OFFLINE set). {hint}")
    return path
