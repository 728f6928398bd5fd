"""Cross-request KV reuse: block identities, a tiered store, and prefill from cached blocks."""

from kvbench.reuse.cache import ReuseCache, ReuseConfig, RequestReuse

__all__ = ["ReuseCache", "ReuseConfig", "RequestReuse"]
