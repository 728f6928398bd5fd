"""A paged pool of KV blocks: block tables, reference counts, a free list and a prefix cache.

Every block holds `block_size` token slots. A request's block table lists its blocks in order, so its
entry e lives in slot `table[e // block_size] * block_size + e % block_size`; entry e is the token at
position e until a KV policy evicts (`drop`), after which the entries are the kept tokens in position order. A full block whose
tokens were computed gets its chain key (`kvbench.reuse.blocks`: the key of the previous block plus
these tokens, so equal keys mean equal prefixes); a later request whose prompt starts with the same
tokens takes a reference to that block instead of computing it again. A hit is confirmed token by
token and against its parent key, so a key collision can never hand out the wrong KV.

A block nobody references keeps its key and stays hittable ("cached"), in LRU order, until the pool
needs it: allocation takes never-keyed free blocks first, then evicts the least recently released
(passing it to `on_evict` first, where set: `kvbench.serve.spill` copies it into the reuse store).
`reserve` admission promises blocks to a request up front; promised blocks are not available to others.
Eviction and prefix caching exclude each other: an engine whose policy evicts keys nothing (`namespace`
None), since a table whose entries are not its first positions is no prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.reuse import blocks as chain
from kvbench.reuse.blocks import Namespace


@dataclass(frozen=True)
class PoolUsage:
    """Exact accounting at one moment. used + cached + free = total blocks; `promised` are free or
    cached blocks set aside for reserve-admitted requests; `tokens_held` counts computed token slots in
    used blocks (shared blocks once), so reserved bytes / used bytes is the internal fragmentation.
    `quantized` blocks (`kvbench.serve.quant_blocks`) are held besides, full, at `quantized_block_bytes`."""

    total: int
    used: int
    cached: int
    free: int
    promised: int
    tokens_held: int
    block_bytes: int
    token_bytes: int
    quantized: int = 0
    quantized_block_bytes: int = 0

    @property
    def bytes_quantized(self) -> int:
        return self.quantized * self.quantized_block_bytes

    @property
    def bytes_used(self) -> int:
        return self.tokens_held * self.token_bytes + self.bytes_quantized

    @property
    def bytes_reserved(self) -> int:
        return (self.used + self.promised) * self.block_bytes + self.bytes_quantized

    @property
    def bytes_cached(self) -> int:
        return self.cached * self.block_bytes

    @property
    def bytes_free(self) -> int:
        return self.free * self.block_bytes - self.bytes_quantized


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, token_bytes: int, namespace: Namespace | None = None):
        """namespace: the chain keys' namespace; None turns prefix caching off."""
        self.num_blocks, self.block_size, self.token_bytes = num_blocks, block_size, token_bytes
        self.namespace = namespace
        self.refs = [0] * num_blocks
        self.filled = [0] * num_blocks  # computed token slots per block
        self.tables: dict[int, list[int]] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0, keyed; oldest first
        self._key_of: dict[int, tuple[str, str | None, tuple[int, ...]]] = {}  # block -> (key, parent, tokens)
        self._block_of: dict[str, int] = {}
        self._position_of: dict[int, int] = {}  # keyed block -> its first token's position
        self._promised: dict[int, int] = {}
        # called as (block, key, parent, tokens, position) when a cached block is evicted, before its slots
        # are reused: the K/V are still in the store (kvbench.serve.spill copies them to the reuse store)
        self.on_evict: Callable[[int, str, str | None, tuple[int, ...], int], None] | None = None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def available(self) -> int:
        """Blocks a new allocation may take: free, or cached (evicted on demand), minus promises."""
        return len(self._free) + len(self._cached) - sum(self._promised.values())

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks holding a prefix of `tokens`, confirmed token by token. At least one token is
        left to compute, since the request's next token needs the last position's logits."""
        if self.namespace is None:
            return []
        found, parent = [], None
        for start in range(0, len(tokens) - self.block_size, self.block_size):
            block_tokens = tuple(tokens[start:start + self.block_size])
            key = chain.extend_chain(parent, block_tokens, self.namespace)
            block = self._block_of.get(key)
            if block is None or self._key_of[block] != (key, parent, block_tokens):
                break
            found.append(block)
            parent = key
        return found

    def admission_cost(self, matched: list[int], num_tokens: int) -> int:
        """Available blocks that admitting with `matched` and slots for `num_tokens` tokens takes."""
        revived = sum(1 for b in matched if self.refs[b] == 0)  # cached blocks become used
        return revived + max(0, self.blocks_for(num_tokens) - len(matched))

    def admit(self, request_id: int, matched: list[int], promise_tokens: int = 0) -> None:
        """Open the request's table with its matched prefix blocks; promise blocks for `promise_tokens`."""
        if request_id in self.tables:
            raise KvbenchError(f"request {request_id} already holds blocks")
        for block in matched:
            self._take(block)
        self.tables[request_id] = list(matched)
        if promise_tokens:
            self._promised[request_id] = max(0, self.blocks_for(promise_tokens) - len(matched))

    def ensure(self, request_id: int, num_tokens: int) -> bool:
        """Grow the table to hold `num_tokens` slots; False (and nothing changed) when the pool is short."""
        table = self.tables[request_id]
        missing = self.blocks_for(num_tokens) - len(table)
        if missing <= 0:
            return True
        own = self._promised.get(request_id, 0)
        if missing > self.available + min(own, missing):
            return False
        for _ in range(missing):
            table.append(self._allocate())
        if own:
            self._promised[request_id] = max(0, own - missing)
        return True

    def slots(self, request_id: int, start: int, end: int) -> list[int]:
        table, bs = self.tables[request_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def commit(self, request_id: int, tokens: list[int], start: int, num_computed: int, keys: list[str]) -> None:
        """Record that entries [start, num_computed) now have KV (`tokens[start:num_computed]` when nothing
        was evicted, as always with prefix caching on): count the slots, and key every newly full block
        (extending `keys`, the request's chain so far) so later requests can hit it."""
        table, bs = self.tables[request_id], self.block_size
        for i in range(start // bs, self.blocks_for(num_computed)):
            self.filled[table[i]] = max(self.filled[table[i]], min(bs, num_computed - i * bs))
        if self.namespace is None:
            return
        while (len(keys) + 1) * bs <= num_computed:
            i = len(keys)
            parent = keys[-1] if keys else None
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            key = chain.extend_chain(parent, block_tokens, self.namespace)
            keys.append(key)
            block = table[i]
            if key not in self._block_of and block not in self._key_of:  # an equal block computed twice stays unkeyed
                self._key_of[block] = (key, parent, block_tokens)
                self._block_of[key] = block
                self._position_of[block] = i * bs

    def release(self, request_id: int) -> None:
        """Drop the request's references, tail first, so its last blocks are evicted before its prefix."""
        self._promised.pop(request_id, None)
        for block in reversed(self.tables.pop(request_id)):
            self._unref(block)

    def drop(self, request_id: int, first: int, count: int, entries: int) -> None:
        """Evict: release `count` blocks of the request's table from table index `first` (the blocks after
        them move up); `entries` is how many the table holds then, which sets its blocks' filled slots."""
        table, bs = self.tables[request_id], self.block_size
        assert self.namespace is None, "a keyed pool cannot evict: its blocks are prefixes"
        dropped = table[first:first + count]
        del table[first:first + count]
        assert self.blocks_for(entries) == len(table), "eviction left a table of the wrong size"
        for block in dropped:
            self._unref(block)
        for i, block in enumerate(table):
            self.filled[block] = min(bs, entries - i * bs)

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._key_of:
                self._cached[block] = None
            else:
                self.filled[block] = 0
                self._free[block] = None

    def usage(self) -> PoolUsage:
        free, cached = len(self._free), len(self._cached)
        used = self.num_blocks - free - cached
        held = sum(f for b, f in enumerate(self.filled) if self.refs[b] > 0)
        return PoolUsage(self.num_blocks, used, cached, free, sum(self._promised.values()), held,
                         self.block_size * self.token_bytes, self.token_bytes)

    def check(self) -> None:
        """Assert the invariants (for tests and debugging)."""
        counted = [0] * len(self.refs)  # (a subclass may hold ids past num_blocks)
        for table in self.tables.values():
            for block in table:
                counted[block] += 1
        assert counted == self.refs, "ref counts differ from table references"
        assert all(self.refs[b] == 0 and b not in self._key_of for b in self._free), "a free block is held or keyed"
        assert all(self.refs[b] == 0 and b in self._key_of for b in self._cached), "a cached block is held or unkeyed"
        assert not set(self._free) & set(self._cached)
        used = sum(1 for r in self.refs[:self.num_blocks] if r > 0)
        assert used + len(self._free) + len(self._cached) == self.num_blocks, "free + used + cached != total"
        assert self.available >= 0, "more blocks promised than the pool has"
        for block, (key, parent, block_tokens) in self._key_of.items():
            assert self._block_of[key] == block
            assert chain.extend_chain(parent, block_tokens, self.namespace) == key, "a key does not re-derive"
        assert len(self._block_of) == len(self._key_of) and self._position_of.keys() == self._key_of.keys()

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self._cached.pop(block)
        self.refs[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block, _ = self._free.popitem(last=False)
        else:
            block, _ = self._cached.popitem(last=False)  # evict the least recently released
            key, parent, block_tokens = self._key_of.pop(block)
            del self._block_of[key]
            position = self._position_of.pop(block)
            if self.on_evict is not None:
                self.on_evict(block, key, parent, block_tokens, position)
            self.filled[block] = 0
        self.refs[block] = 1
        return block
