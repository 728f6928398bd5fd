"""Cross-request KV reuse: block identities, a tiered store, prefill from cached blocks, and the engine users call."""

from kvbench.reuse.cache import ReuseCache, ReuseConfig, RequestReuse
from kvbench.reuse.engine import ReusingEngine, Verification

__all__ = ["ReuseCache", "ReuseConfig", "RequestReuse", "ReusingEngine", "Verification"]
