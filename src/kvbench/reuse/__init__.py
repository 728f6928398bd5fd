"""Cross-request KV reuse: block identities, a tiered store, prefill from cached blocks, and the engine users call.

The public names load on first use, so torch-free readers (reports) can import `kvbench.reuse.bar`."""

from __future__ import annotations

from importlib import import_module

_PUBLIC = {"ReuseCache": "cache", "ReuseConfig": "cache", "RequestReuse": "cache", "ReusingEngine": "engine",
           "Verification": "engine", "QualityBar": "bar"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kvbench.reuse' has no attribute {name!r}")
    return getattr(import_module(f"kvbench.reuse.{_PUBLIC[name]}"), name)
