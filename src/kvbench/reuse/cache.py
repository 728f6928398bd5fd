"""The reuse cache the engine consults: plan a prompt against the store, prefill only what is
missing, and store the exactly computed blocks afterwards."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kvbench.errors import KvbenchError
from kvbench.reuse import assemble
from kvbench.reuse.assemble import RECOMPUTE, Recompute
from kvbench.reuse.blocks import Namespace, chain_keys, content_key
from kvbench.reuse.plan import plan
from kvbench.reuse.rope import Rerotator, check_rerotation
from kvbench.reuse.store import POLICIES, Block, DiskTier, RamTier, TieredStore

log = logging.getLogger("kvbench.reuse")

MODES = ("prefix", "chunk")
GiB = 1 << 30


@dataclass(frozen=True)
class ReuseConfig:
    mode: str = "prefix"  # `prefix`: exact prefix hits only; `chunk`: also the same tokens anywhere
    # chunk hits: none | selective | cacheblend. `none`: on the interior-reuse benchmark (benchmarks/RESULTS.md,
    # reuse-interior) recomputing the first 32 tokens of each run gained no quality (the same top-1 on three document
    # kinds, lower on rag) and cost 100-300 ms (rag: 3.7x instead of 5.1x): the K/V drift all over the document
    recompute: str = "none"
    block_size: int = 64
    selective_tokens: int = 32
    blend_fraction: float = 0.15
    probe_layer: int = 1
    ram_bytes: int = 2 * GiB
    ram_policy: str = "lru"
    ram_int8: bool = False  # store RAM blocks as int8 (lossy: hits become approximate)
    disk_dir: str | None = None
    disk_bytes: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise KvbenchError(f"unknown reuse mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.recompute not in RECOMPUTE:
            raise KvbenchError(f"unknown recompute strategy {self.recompute!r}; valid: {', '.join(RECOMPUTE)}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise KvbenchError(f"block_size must be a positive number of tokens, got {self.block_size!r}")
        if self.ram_policy not in POLICIES:
            raise KvbenchError(f"unknown eviction policy {self.ram_policy!r}; valid: {', '.join(POLICIES)}")
        if self.selective_tokens < 0:
            raise KvbenchError(f"selective_tokens must be >= 0, got {self.selective_tokens}")
        if not 0 < self.blend_fraction <= 1:
            raise KvbenchError(f"blend_fraction must be in (0, 1], got {self.blend_fraction}")

    @property
    def recompute_plan(self) -> Recompute:
        return Recompute(self.recompute, self.selective_tokens, self.blend_fraction, self.probe_layer)


@dataclass
class RequestReuse:
    """What reuse did for one request (per request, never cumulative)."""

    prompt_tokens: int
    cached_tokens: int = 0  # taken from the store and not recomputed
    exact_tokens: int = 0  # of those, exact prefix hits
    recomputed_tokens: int = 0  # hit, but computed again (selective / cacheblend)
    computed_tokens: int = 0  # run through the model in prefill
    tier_tokens: dict[str, int] = field(default_factory=dict)  # hit tokens read per tier (recomputed ones included)
    load_ms: float = 0.0  # host time for lookup, reading, assembling and choosing what to recompute (cacheblend's probe)
    exact_until: int = 0  # positions before this were computed exactly (safe to store)

    @property
    def reuse_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens


def _check_model(lm, config: ReuseConfig) -> None:
    """Refuse what the assembly cannot do exactly: caches that keep only a window of positions, and
    (for chunk reuse, which needs a custom 4D mask) attention kernels that ignore such a mask."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in DynamicCache(config=lm.config).layers}
    if kinds != {DynamicLayer.__name__}:
        raise KvbenchError(
            f"{lm.name} uses {', '.join(sorted(kinds))} cache layers (sliding-window or hybrid attention); "
            "cross-request reuse supports models whose every layer keeps all positions"
        )
    attention = getattr(lm.config, "_attn_implementation", "sdpa")
    if config.mode == "chunk" and attention not in ("sdpa", "eager"):
        raise KvbenchError(
            f"chunk reuse needs sdpa or eager attention (a 4D mask interleaves cached and computed tokens); "
            f"{lm.name} runs {attention!r}: load it with attn_implementation='sdpa' or use mode 'prefix'"
        )


class ReuseCache:
    """Cross-request KV reuse for one model: a tiered block store plus the logic to use it."""

    def __init__(self, lm, config: ReuseConfig = ReuseConfig()):
        self.lm, self.config = lm, config
        self.ns = Namespace(lm.fingerprint, str(lm.dtype).removeprefix("torch."), config.block_size)
        _check_model(lm, config)
        self.rerotator = Rerotator(lm.model) if config.mode == "chunk" else None
        if self.rerotator is not None:
            check_rerotation(lm.model, self.rerotator)
        layers = lm.config.num_hidden_layers
        if config.mode == "chunk" and config.recompute == "cacheblend" and not 1 <= config.probe_layer <= layers - 1:
            raise KvbenchError(
                f"probe_layer must be in [1, {layers - 1}] for this {layers}-layer model (layer 0's K/V "
                "do not depend on context, so it cannot show deviation)"
            )
        block = self.block_bytes
        if config.ram_bytes < block:
            raise KvbenchError(
                f"the RAM tier's budget ({config.ram_bytes} bytes) is too small for one block of "
                f"{config.block_size} tokens ({block} bytes); raise ram_bytes or lower block_size"
            )
        if config.disk_bytes is not None and config.disk_bytes < block:
            raise KvbenchError(
                f"the disk tier's budget ({config.disk_bytes} bytes) is too small for one block of "
                f"{config.block_size} tokens ({block} bytes); raise disk_bytes or lower block_size"
            )
        disk = DiskTier(config.disk_dir, self.ns, config.disk_bytes) if config.disk_dir else None
        self.store = TieredStore(RamTier(config.ram_bytes, config.ram_policy, config.ram_int8), disk)
        self.requests = self.hits = self.approximate_hits = self.misses = 0

    @property
    def block_bytes(self) -> int:
        return self.lm.kv_bytes_per_token * self.config.block_size

    def prefill(self, cache, tokens: list[int]) -> tuple[torch.Tensor, RequestReuse]:
        """Fill `cache` for `tokens` from the store plus computation; the last position's logits."""
        started = time.perf_counter()
        info = RequestReuse(prompt_tokens=len(tokens))
        hits = plan(tokens, self.store, self.ns, chunk=self.config.mode == "chunk")
        loaded, lossy = [], set()
        for hit in reversed(hits):  # last block first: a chain's first blocks end up most recent, evicted last
            found = self.store.get(hit.key)
            if found is None:  # evicted or corrupt since planning: compute those tokens instead
                continue
            block, tier = found
            if block.tokens[:hit.length] != tuple(tokens[hit.start:hit.start + hit.length]):
                continue  # a key collision would land here: never use K/V of other tokens
            loaded.insert(0, (hit, block))
            info.tier_tokens[tier] = info.tier_tokens.get(tier, 0) + hit.length
            if tier == "ram" and self.config.ram_int8:
                lossy.add(hit.key)
        kv = assemble.gather(loaded, self.rerotator, self.lm.device) if loaded else None
        runs = assemble.approximate_runs(loaded, lossy)
        recompute = self._recompute_positions(tokens, loaded, kv, runs)
        info.exact_until = runs[0][0].start if runs else len(tokens)
        hit_tokens = sum(h.length for h, _ in loaded)
        info.recomputed_tokens = len(recompute)
        info.cached_tokens = hit_tokens - len(recompute)
        info.exact_tokens = sum(h.length for h, _ in loaded if h.exact and h.key not in lossy)
        info.computed_tokens = len(tokens) - info.cached_tokens
        info.load_ms = (time.perf_counter() - started) * 1e3
        self.requests += 1
        self.hits += len(loaded)
        self.approximate_hits += sum(1 for h, _ in loaded if not h.exact or h.key in lossy)
        self.misses += max(0, len(tokens) // self.config.block_size - len(loaded))
        return assemble.prefill(self.lm, cache, tokens, loaded, kv, recompute), info

    def _recompute_positions(self, tokens, loaded, kv, runs) -> torch.Tensor:
        none = torch.zeros(0, dtype=torch.long)
        if not runs or self.config.mode == "prefix" or self.config.recompute == "none":
            return none
        if self.config.recompute == "selective":
            return assemble.selective_positions(runs, self.config.selective_tokens)
        covered = torch.cat([torch.arange(h.start, h.start + h.length) for h, _ in loaded])
        ids = torch.tensor([tokens], dtype=torch.long, device=self.lm.device)
        return assemble.blend_positions(self.lm, ids, covered, kv, runs, self.config.recompute_plan)

    def after_request(self, cache, tokens: list[int], outcome: RequestReuse) -> None:
        """The engine's call after a request (untimed): store the blocks it computed exactly."""
        self.store_blocks(cache, tokens, outcome.exact_until)

    def store_blocks(self, cache, tokens: list[int], exact_until: int) -> int:
        """Store every full block of `tokens` before `exact_until` that the store lacks; returns how many."""
        bs = self.config.block_size
        keys = chain_keys(tokens[:exact_until], self.ns)
        new = [(i, k) for i, k in enumerate(keys) if k not in self.store]
        if not new:
            return 0
        stored = 0
        for i, key in reversed(new):  # first blocks stored last: the most recent, evicted last
            span = slice(i * bs, (i + 1) * bs)  # one copy of just this block, never of the whole prefix
            kv = torch.stack([torch.stack([layer.keys[0, :, span], layer.values[0, :, span]]) for layer in cache.layers])
            block_tokens = tuple(tokens[span])
            try:
                self.store.put(key, Block(kv.cpu(), i * bs, block_tokens, content_key(block_tokens, self.ns)))
            except KvbenchError as exc:  # a full or failing disk must not lose the request that ran
                log.warning("kvbench reuse: could not store a block: %s", exc)
                break
            stored += 1
        return stored

    def clear_ram(self) -> None:
        """Empty the RAM tier (the disk tier keeps its files): the next request is cold unless on disk."""
        ram = self.store.ram
        self.store.ram = RamTier(ram.budget, ram.policy, ram.int8)
        if self.store.disk is None:
            self.store.by_content.clear()
            self.store.by_fingerprint.clear()

    def stats(self) -> dict:
        """Counters since this cache was made: blocks hit (of which approximate) and missed over all
        requests, and per tier its hits, misses, evictions, corrupt entries, bytes and blocks held."""
        return {"requests": self.requests, "hits": self.hits, "approximate_hits": self.approximate_hits,
                "misses": self.misses, "tiers": self.store.stats()}
