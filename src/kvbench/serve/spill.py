"""A second-level prefix cache under the paged pool, in the reuse store: `EngineConfig(kv_spill_ram=...)`.

This is what vLLM's KV offloading connector and LMCache do for a GPU pool. A keyed block the pool evicts
(cached, referenced by nobody, its slots needed by an allocation) is first copied, K and V of every layer,
into `kvbench.reuse.store.TieredStore` under its chain key, in the reuse path's `Block` format
(`[layers, 2, kv_heads, block_size, head_dim]` with its position, tokens and parent key): a RAM tier of
`kv_spill_ram` bytes (LRU), and where `kv_spill_dir` is set a disk tier written through (checksummed files
that outlive the process; a corrupt one is a logged miss). At admission, after the pool's own prefix hits,
the chain continues in the store: the blocks found there are read, confirmed as the pool confirms its own
hits (tokens and parent key), copied into fresh pool blocks and keyed as if computed. The request's cached
tokens count them, by tier (`pool`, `ram`, `disk`: `Request.num_cached_by_tier`).

Spill happens at eviction, not on write (write-through). vLLM and LMCache store every block as it is
computed, but asynchronously, beside the forward; this engine copies synchronously, so write-through
would put a copy (and with a disk tier a write and an fsync) of every prefill block on the step's critical
path, while at eviction only the blocks that leave the pool are copied, once each (a key the store holds
is not copied again). The copy is timed in the step whose allocation evicts (its scheduling), the load in
the step that admits the request. On a CPU the pool is host memory: the bytes are exact, the copy time is
host-to-host, not a GPU's PCIe transfer.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import torch

from kvbench.errors import KvbenchError
from kvbench.reuse.blocks import Namespace, chain_keys, content_key
from kvbench.reuse.store import Block, DiskTier, RamTier, TieredStore

if TYPE_CHECKING:
    from kvbench.serve.config import EngineConfig
    from kvbench.serve.kv import KV, KVStore

log = logging.getLogger("kvbench.serve")

Found = tuple[str, str | None]  # a block's chain key and its parent's


def check_config(config: EngineConfig) -> None:
    """Refuse, in one line, a spill the engine cannot do (called by `EngineConfig` when a spill field is set)."""
    if config.kv_spill_ram is None:
        raise KvbenchError("kv_spill_dir needs kv_spill_ram, the RAM tier every spilled block passes through; "
                           "set kv_spill_ram, e.g. 1GiB")
    if config.kv_spill_dir is not None and (not isinstance(config.kv_spill_dir, str) or not config.kv_spill_dir):
        raise KvbenchError(f"kv_spill_dir must be a directory path, got {config.kv_spill_dir!r}")
    if config.kv_backend != "paged":
        raise KvbenchError(f"kv_spill_ram spills the paged pool's prefix cache; the {config.kv_backend} backend "
                           "has none: set kv_backend: paged or drop kv_spill_ram")
    if not config.enable_prefix_caching:
        raise KvbenchError("kv_spill_ram spills the prefix cache's blocks, and enable_prefix_caching is off; "
                           "turn it on or drop kv_spill_ram")
    from kvbench.serve.policies import make_policy

    policy = make_policy(config)
    if policy is not None and not policy.caches_prefixes:
        raise KvbenchError(f"strategy {config.strategy!r} turns prefix caching off (its blocks are not plain prefix "
                           "KV), and so its spill; drop kv_spill_ram or the strategy")


def make_spill(config: EngineConfig, kv: KV) -> PoolSpill | None:
    """The spill `config` asks for, hooked into `kv`'s pool; None when it asks for none."""
    if config.kv_spill_ram is None:
        return None
    spill = PoolSpill(kv.store, kv.pool.namespace, config.kv_spill_ram, config.kv_spill_dir)
    kv.pool.on_evict = spill.spill
    return spill


class PoolSpill:
    """The reuse store behind one pool: `spill` is the pool's eviction hook; `find`, `fetch` and `load` are
    admission's three steps (look up without reading, read and confirm, copy into allocated blocks)."""

    def __init__(self, store: KVStore, namespace: Namespace, ram_bytes: int, disk_dir: str | None):
        self.store, self.ns = store, namespace
        k = store.k[0]
        self.shape = (len(store.k), 2, k.shape[2], k.shape[1], k.shape[3])  # a Block's kv
        self.block_bytes = store.block_bytes
        if ram_bytes < self.block_bytes:
            raise KvbenchError(f"kv_spill_ram ({ram_bytes} bytes) holds no block of {namespace.block_size} tokens "
                               f"({self.block_bytes} bytes); raise kv_spill_ram")
        disk = DiskTier(disk_dir, namespace) if disk_dir is not None else None
        self.tiers = TieredStore(RamTier(ram_bytes), disk)
        self.blocks_spilled = 0  # blocks copied into the store (each key once)
        self.spill_failures = 0  # spills the disk tier refused (logged; the RAM tier kept the block)
        self.tokens_loaded: Counter[str] = Counter()  # by the tier they came from

    def spill(self, block: int, key: str, parent: str | None, tokens: tuple[int, ...], position: int) -> None:
        """`BlockPool.on_evict`: copy pool block `block` into the store, unless it holds the key already."""
        if key in self.tiers:
            return
        # read the store's own tensors (as swap does), not `gather`: a host tier would count a spill as moved
        kv = torch.stack([torch.stack((k[block], v[block])) for k, v in zip(self.store.k, self.store.v)])
        kv = kv.transpose(2, 3).contiguous().cpu()  # [layers, 2, bs, kvh, d] -> the Block layout
        try:
            self.tiers.put(key, Block(kv, position, tokens, content_key(tokens, self.ns), parent))
        except KvbenchError as exc:  # a full or failing disk must not fail the step that evicted
            self.spill_failures += 1
            log.warning("kvbench serve: could not spill a block to disk: %s", exc)
        if key in self.tiers:
            self.blocks_spilled += 1

    def find(self, tokens: list[int], start: int) -> list[Found]:
        """The blocks after the pool's first `start` hits that the store holds, in chain order up to the
        first it lacks, without reading them; as `BlockPool.match_prefix`, one token is left to compute."""
        if not self.tiers.ram.entries and not (self.tiers.disk and self.tiers.disk.meta):
            return []
        keys = chain_keys(tokens[:len(tokens) - 1], self.ns)
        found = []
        for i in range(start, len(keys)):
            if keys[i] not in self.tiers:
                break
            found.append((keys[i], keys[i - 1] if i else None))
        return found

    def fetch(self, tokens: list[int], start: int, found: list[Found]) -> list[tuple[Block, str]]:
        """Read the `found` blocks (block `start` of `tokens` first) with their tiers, up to the first that is
        gone since, corrupt, or not these tokens after this parent: never K/V of another prefix."""
        bs, fetched = self.ns.block_size, []
        for i, (key, parent) in enumerate(found, start):
            hit = self.tiers.get(key)
            if hit is None:
                break
            block = hit[0]
            if (block.tokens != tuple(tokens[i * bs:(i + 1) * bs]) or block.parent != parent
                    or block.position != i * bs or tuple(block.kv.shape) != self.shape):
                break
            fetched.append(hit)
        return fetched

    def load(self, blocks: list[int], fetched: list[tuple[Block, str]]) -> dict[str, int]:
        """Copy the fetched K/V into pool `blocks` (as many, in order); the tokens loaded per tier."""
        device = self.store.k[0].device
        bs = self.ns.block_size
        kv = torch.stack([block.kv for block, _ in fetched]).to(device)  # [n, layers, 2, kvh, bs, d]
        slots = (torch.tensor(blocks, device=device)[:, None] * bs + torch.arange(bs, device=device)).flatten()
        for layer in range(self.shape[0]):
            keys, values = (kv[:, layer, i].transpose(1, 2).flatten(0, 1) for i in (0, 1))  # [n * bs, kvh, d]
            self.store.write(layer, slots, keys, values)
        tiers = Counter()
        for _, tier in fetched:
            tiers[tier] += bs
        self.tokens_loaded.update(tiers)
        return dict(tiers)

    def stats(self) -> dict:
        """Blocks and bytes spilled, tokens loaded back per tier, and each tier's own counters and bytes held."""
        return {"blocks_spilled": self.blocks_spilled, "bytes_spilled": self.blocks_spilled * self.block_bytes,
                "spill_failures": self.spill_failures, "tokens_loaded": dict(self.tokens_loaded),
                "bytes_loaded": sum(self.tokens_loaded.values()) // self.ns.block_size * self.block_bytes,
                "tiers": self.tiers.stats()}
