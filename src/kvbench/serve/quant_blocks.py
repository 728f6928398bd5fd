"""Quantized KV blocks on the paged pool: the `quantized` policy (`QuantizedPolicy`, registered in
`kvbench.serve.policies.POLICIES`), its pool and its store.

A request's table lists block ids of two kinds: float ids `[0, F)` are blocks of the float store (the
`KVStore` tensors `[F, block_size, kvh, d]`), quantized ids `[F, F + Q)` are blocks of the codes/scales
arena, KIVI-style with `kvbench.strategies.quantized`'s `quantize` / `pack` (the block is the group):
per layer and block,
- keys per channel over the block's tokens: codes `[bs, kvh, d * bits / 8]`, scale and zero `[kvh, d]`;
- values per token in groups of `vgroup` channels: codes `[bs, kvh, d * bits / 8]`, scale and zero
  `[bs, kvh, d / vgroup]`; scales and zeros fp16, exactly as the per_seq strategy stores them.
Slot s of a quantized block b is `b * bs + offset` like a float slot, so `gather` tells the two apart by
`s >= F * bs` and dequantizes those with the per_seq strategy's arithmetic.

The pool is byte-based: its budget is the float pool's bytes (`F` float blocks) and a block of either
kind costs its own bytes, so F and Q are each sized for the budget alone and a float allocation needs
free ids *and* free bytes for a float block. Quantizing a block frees its float block (refs permitting:
never shared, since prefix caching is off under this policy) and takes a quantized id, so it always fits.
The arena is allocated with `torch.zeros` (like the float store): on a CPU, pages nobody wrote cost no
resident memory, but float ids are handed out oldest-freed first, so over a run every float block gets
touched and resident memory approaches the budget plus the quantized bytes held; on CUDA both are
allocated, up to twice the budget (the serve kind's memory preflight counts both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.serve.block_pool import BlockPool, PoolUsage
from kvbench.serve.kv import KVStore, StoreShape
from kvbench.serve.policies import POLICIES, PagedPolicy
from kvbench.strategies.quantized import pack, quantize, unpack

if TYPE_CHECKING:
    from kvbench.serve.request import Request
    from kvbench.strategies.base import CacheStrategy

SCALE_DTYPE = torch.float16


def value_group(bits: int, block_size: int, head_dim: int) -> int:
    """Channels per value group (`min(group_size, head_dim)`, as the per_seq strategy), checked the same way."""
    group = min(block_size, head_dim)
    if head_dim % group or group * bits % 8:
        raise KvbenchError(f"block_size (= group_size) {block_size} does not divide head_dim {head_dim} into whole "
                           "byte-packable value groups; use a block_size that divides head_dim, such as 32 or 64")
    return group


def quantized_block_bytes(bits: int, shape: StoreShape) -> int:
    """Bytes of one quantized block over every layer: codes, and fp16 scale and zero of keys and values."""
    bs, h, d = shape.block_size, shape.kv_heads, shape.head_dim
    codes = 2 * bs * h * d * bits // 8
    scales = 2 * SCALE_DTYPE.itemsize * (h * d + bs * h * d // value_group(bits, bs, d))
    return shape.layers * (codes + scales)


class QuantizedKVStore(KVStore):
    """The float store plus the arena of `num_quantized` blocks (`quantize` fills one, `gather` reads both)."""

    def __init__(self, shape: StoreShape, bits: int, num_quantized: int):
        super().__init__(*shape.args)
        self.bits, self.block_size, self.dtype = bits, shape.block_size, shape.dtype
        self.vgroup = value_group(bits, shape.block_size, shape.head_dim)
        bs, h, d, nq = shape.block_size, shape.kv_heads, shape.head_dim, num_quantized

        def arena(*dims, dtype=torch.uint8):
            return [torch.zeros(dims, dtype=dtype, device=shape.device) for _ in range(shape.layers)]

        self.key_codes, self.value_codes = arena(nq, bs, h, d * bits // 8), arena(nq, bs, h, d * bits // 8)
        self.key_scale, self.key_zero = arena(nq, h, d, dtype=SCALE_DTYPE), arena(nq, h, d, dtype=SCALE_DTYPE)
        groups = d // self.vgroup
        self.value_scale = arena(nq, bs, h, groups, dtype=SCALE_DTYPE)
        self.value_zero = arena(nq, bs, h, groups, dtype=SCALE_DTYPE)
        self.float_slots = shape.num_blocks * bs

    def quantize(self, blocks: list[int], into: list[int]) -> None:
        """Quantize float blocks `blocks` into arena blocks `into` (indices in the arena), every layer."""
        src = torch.tensor(blocks, device=self.k[0].device)
        dst = torch.tensor(into, device=self.k[0].device)
        for layer in range(len(self.k)):
            keys, values = self.k[layer].index_select(0, src), self.v[layer].index_select(0, src)  # [n, bs, h, d]
            kc, ks, kz = quantize(keys, self.bits, dim=1)
            n, bs, h, d = values.shape
            vc, vs, vz = quantize(values.view(n, bs, h, d // self.vgroup, self.vgroup), self.bits, dim=4)
            self.key_codes[layer].index_copy_(0, dst, pack(kc, self.bits))
            self.key_scale[layer].index_copy_(0, dst, ks.squeeze(1))
            self.key_zero[layer].index_copy_(0, dst, kz.squeeze(1))
            self.value_codes[layer].index_copy_(0, dst, pack(vc.view(n, bs, h, d), self.bits))
            self.value_scale[layer].index_copy_(0, dst, vs.squeeze(4))
            self.value_zero[layer].index_copy_(0, dst, vz.squeeze(4))

    def dequantize(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V `[n, kvh, d]` of arena slots `[n]` (block * bs + offset), with the per_seq strategy's arithmetic
        (`codes * scale + zero` in the model's dtype, here in place). Where the slots are whole blocks in
        order (as the attention's context slots are), a key scale is read once per block and broadcast
        over its tokens instead of gathered per token."""
        bs, dtype, n = self.block_size, self.dtype, slots.shape[0]
        run = bs if n % bs == 0 and _whole_blocks(slots.view(-1, bs)) else 1
        blocks = slots[::run] // bs
        k = unpack(_select_rows(self.key_codes[layer].flatten(0, 1), slots), self.bits).to(dtype)  # [n, h, d]
        k = k.view(n // run, run, *k.shape[1:])
        k.mul_(self.key_scale[layer].index_select(0, blocks).to(dtype).unsqueeze(1))
        k.add_(self.key_zero[layer].index_select(0, blocks).to(dtype).unsqueeze(1))
        v = unpack(_select_rows(self.value_codes[layer].flatten(0, 1), slots), self.bits).to(dtype)
        h, d = v.shape[1:]
        v = v.view(n, h, d // self.vgroup, self.vgroup)
        v.mul_(_select_rows(self.value_scale[layer].flatten(0, 1), slots).to(dtype).unsqueeze(3))
        v.add_(_select_rows(self.value_zero[layer].flatten(0, 1), slots).to(dtype).unsqueeze(3))
        return k.view(n, h, d), v.view(n, h, d)

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float slots as they are, quantized ones (`>= float_slots`) dequantized and merged in place."""
        flat = index.flatten()
        quantized = flat >= self.float_slots
        if not bool(quantized.any()):
            return super().gather(layer, index)
        keys, values = super().gather(layer, torch.where(quantized, 0, flat))  # [N, kvh, d]
        rows = quantized.nonzero().squeeze(1)
        k, v = self.dequantize(layer, flat.index_select(0, rows) - self.float_slots)
        keys.index_copy_(0, rows, k)
        values.index_copy_(0, rows, v)
        return keys.view(*index.shape, *keys.shape[1:]), values.view(*index.shape, *values.shape[1:])


def _whole_blocks(runs: torch.Tensor) -> bool:
    """Whether each row of `runs` `[m, bs]` is the slots of one block, in order."""
    bs = runs.shape[1]
    return bool((runs[:, 0] % bs == 0).all() and (runs == runs[:, :1] + torch.arange(bs, device=runs.device)).all())


def _select_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`t.index_select(0, index)` for a contiguous `t`, copying each row as the widest integers its bytes
    divide into (an index_select of narrow elements copies one at a time: 8x slower for uint8 codes)."""
    row = t[0].numel() * t.element_size()
    wide = next(w for w in (torch.int64, torch.int32, torch.int16, torch.uint8) if row % w.itemsize == 0)
    return t.view(t.shape[0], -1).view(wide).index_select(0, index).view(t.dtype).view(-1, *t.shape[1:])


class QuantizedBlockPool(BlockPool):
    """A `BlockPool` of float ids `[0, num_blocks)` and quantized ids `[num_blocks, num_blocks +
    num_quantized)`, under a budget of `num_blocks` float blocks' bytes. Prefix caching stays off."""

    def __init__(self, num_blocks: int, block_size: int, token_bytes: int, quantized_bytes: int):
        super().__init__(num_blocks, block_size, token_bytes, namespace=None)
        self.block_bytes, self.quantized_bytes = block_size * token_bytes, quantized_bytes
        self.budget = num_blocks * self.block_bytes
        self.num_quantized = self.budget // quantized_bytes
        self.refs += [0] * self.num_quantized
        self.filled += [0] * self.num_quantized
        self._free_quantized = list(range(num_blocks + self.num_quantized - 1, num_blocks - 1, -1))  # pop: lowest

    @property
    def quantized_held(self) -> int:
        return self.num_quantized - len(self._free_quantized)

    @property
    def bytes_held(self) -> int:
        return (self.num_blocks - len(self._free)) * self.block_bytes + self.quantized_held * self.quantized_bytes

    @property
    def available(self) -> int:
        """Float blocks a new allocation may take: free ids with free bytes for each, minus promises."""
        by_bytes = (self.budget - self.bytes_held) // self.block_bytes
        return min(len(self._free), by_bytes) - sum(self._promised.values())

    def quantize(self, request_id: int, indices: range, store: QuantizedKVStore) -> int:
        """Move the float blocks at table `indices` of the request into the arena; how many moved."""
        table = self.tables[request_id]
        todo = [i for i in indices if table[i] < self.num_blocks]
        if not todo:
            return 0
        assert all(self.refs[table[i]] == 1 for i in todo), "a shared block cannot be quantized"
        into = [self._free_quantized.pop() for _ in todo]
        store.quantize([table[i] for i in todo], [q - self.num_blocks for q in into])
        for i, q in zip(todo, into):
            self._unref(table[i])
            table[i] = q
            self.refs[q], self.filled[q] = 1, self.block_size
        return len(todo)

    def check_engaged(self, request_id: int, indices: range, store: QuantizedKVStore) -> None:
        """Every block at `indices` is an arena block whose scales were written (a written fp16 scale is
        >= 1e-5, the arena starts at zero)."""
        table = self.tables[request_id]
        arena = [table[i] - self.num_blocks for i in indices if table[i] >= self.num_blocks]
        unwritten = bool(arena) and not bool((store.key_scale[0][arena].amin(dim=(1, 2)) > 0).all())
        if len(arena) != len(indices) or unwritten:
            raise NotEngaged(f"quantized: request {request_id} holds {len(arena)} written quantized blocks where "
                             f"{len(indices)} must be quantized by now; the run would measure float KV")

    def _unref(self, block: int) -> None:
        if block < self.num_blocks:
            return super()._unref(block)
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.filled[block] = 0
            self._free_quantized.append(block)

    def usage(self) -> PoolUsage:
        """Float blocks as `BlockPool.usage`, plus the quantized blocks held (whole, `quantized_bytes` each)."""
        base = super().usage()
        held = sum(self.filled[b] for b in range(self.num_blocks) if self.refs[b] > 0)
        return PoolUsage(base.total, base.used, base.cached, base.free, base.promised, held, base.block_bytes,
                         base.token_bytes, self.quantized_held, self.quantized_bytes)

    def check(self) -> None:
        super().check()
        held = {b for table in self.tables.values() for b in table if b >= self.num_blocks}
        assert len(held) + len(self._free_quantized) == self.num_quantized, "quantized ids lost or doubled"
        assert not held & set(self._free_quantized), "a free quantized block is held"
        assert self.bytes_held <= self.budget, "the pool holds more bytes than its budget"


def make_quantized(strategy, shape: StoreShape, token_bytes: int) -> tuple[QuantizedBlockPool, QuantizedKVStore]:
    """The pool and store of the `quantized` policy for a float pool of `shape.num_blocks` blocks."""
    pool = QuantizedBlockPool(shape.num_blocks, shape.block_size, token_bytes,
                              quantized_block_bytes(strategy.bits, shape))
    return pool, QuantizedKVStore(shape, strategy.bits, pool.num_quantized)


class QuantizedPolicy(PagedPolicy):
    """Quantizes, evicts nothing. Once a request's prefill is done (the prompt attended in full precision),
    and after each later step, the blocks that leave the window with the next token are quantized, so a
    decode step attends what the per_seq strategy's would (its window flushes when the token is added).
    Prefix caching is off too: a keyed block, once quantized, is no longer the float KV its key names."""

    evicts = False

    def __init__(self, strategy: CacheStrategy, block_size: int):
        self.strategy, self.block_size, self.budget = strategy, block_size, None
        self.sink_blocks = -(-strategy.sink_tokens // block_size)

    @classmethod
    def check_config(cls, strategy, config):
        if strategy.group_size != config.block_size:
            raise KvbenchError(f"quantized on the paged pool quantizes whole blocks: group_size {strategy.group_size} "
                               f"must equal block_size {config.block_size}; set block_size to {strategy.group_size}")
        if strategy.float_dtype != "model":
            raise KvbenchError(f"quantized float_dtype {strategy.float_dtype!r}: the paged pool's float blocks are "
                               "in the model's dtype; drop float_dtype or set kv_backend: per_seq")
        if config.preemption == "swap":
            raise KvbenchError("preemption swap copies float blocks and quantized blocks live in an arena beside "
                               "them; use preemption recompute with quantized")

    def make_pool_and_store(self, config, shape, token_bytes, namespace):
        return make_quantized(self.strategy, shape, token_bytes)

    def check(self, prompt_len, max_tokens):
        pass  # every token is kept

    def due(self, request: Request) -> range:
        """Table indices that must be quantized once the next token is written: whole blocks past the sinks
        and out of the `residual` most recent entries then. Never the block the token is written to, so with
        residual 0 a block is quantized one step later than the per_seq strategy's group (whose new token
        attends its own group quantized)."""
        entries = request.num_entries
        end = min(entries, entries + 1 - self.strategy.residual)
        return range(self.sink_blocks, max(self.sink_blocks, end // self.block_size))

    def evict(self, request, state, kv, boundary):  # quantizes: nothing is evicted
        due = self.due(request)
        kv.pool.quantize(request.request_id, due, kv.store)
        kv.pool.check_engaged(request.request_id, due, kv.store)


POLICIES["quantized"] = QuantizedPolicy
