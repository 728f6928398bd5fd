"""Cache strategies, registered by name. Importing this package registers the built-in ones."""

from __future__ import annotations

from typing import Any

from kvbench.fields import checked_fields
from kvbench.registry import Registry
from kvbench.strategies.base import Capabilities, CacheStrategy

STRATEGIES: Registry[type[CacheStrategy]] = Registry("strategy")


def register(cls: type[CacheStrategy]) -> type[CacheStrategy]:
    STRATEGIES.register(cls.name, cls)
    return cls


def build_strategy(name: str, **params: Any) -> CacheStrategy:
    """Instantiate a registered strategy; unknown names and parameters list the valid ones, and each
    parameter's value must match its field's type (bits=4.0 is refused, not truncated)."""
    cls = STRATEGIES.get(name)
    return cls(**checked_fields(cls, params, f"strategy {name!r} parameter"))


from kvbench.strategies import baseline, h2o, hf_quantized, offloaded, quantized, sink, snapkv, speculative  # noqa: E402,F401  (registers built-ins)

__all__ = ["STRATEGIES", "Capabilities", "CacheStrategy", "build_strategy", "register"]
