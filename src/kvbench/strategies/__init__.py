"""Cache strategies, registered by name. Importing this package registers the built-in ones."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from kvbench.errors import KvbenchError
from kvbench.registry import Registry
from kvbench.strategies.base import Capabilities, CacheStrategy

STRATEGIES: Registry[type[CacheStrategy]] = Registry("strategy")


def register(cls: type[CacheStrategy]) -> type[CacheStrategy]:
    STRATEGIES.register(cls.name, cls)
    return cls


def build_strategy(name: str, **params: Any) -> CacheStrategy:
    """Instantiate a registered strategy; unknown names and unknown parameters list the valid ones."""
    cls = STRATEGIES.get(name)
    valid = {f.name for f in fields(cls)}
    unknown = set(params) - valid
    if unknown:
        raise KvbenchError(
            f"strategy {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(valid)) or 'none'}"
        )
    return cls(**params)


from kvbench.strategies import baseline, h2o, hf_quantized, offloaded, quantized, sink, snapkv, speculative  # noqa: E402,F401  (registers built-ins)

__all__ = ["STRATEGIES", "Capabilities", "CacheStrategy", "build_strategy", "register"]
