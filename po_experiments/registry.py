"""Name -> function tables behind the variants (algorithms, components, ablations, PPO weightings)."""
from __future__ import annotations

from typing import Callable


def registry(kind: str) -> tuple[dict[str, Callable], Callable]:
    """A table and its decorator: a new variant is one `@register(name)` function (plus its YAML)."""
    table: dict[str, Callable] = {}

    def register(name: str):
        def wrap(fn):
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice")
            table[name] = fn
            return fn
        return wrap

    return table, register
