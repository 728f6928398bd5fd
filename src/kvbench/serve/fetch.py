"""Offload and speculative fetch native to the paged pool: `strategy="offloaded"` and
`strategy="speculative_fetch:budget=..."` on `kv_backend: paged`.

Both keep the pool's K/V in a host tier (`HostTierStore`: host memory, pinned on CUDA) and bring to the
compute device, layer by layer, only what the attention reads, counting exactly the bytes brought in:
- `offloaded`: every row's whole context (no padding: a group's rows have their real slots moved once,
  then laid out padded on the device);
- `speculative_fetch` (InfiniGen; the per_seq reference is `kvbench.strategies.speculative`): once a
  request's prefill is complete, its scoring channels are picked per layer and KV head (the
  `partial_channels` largest mean |k| over its prompt keys) and those channels of its keys go to a side
  pool of partial keys `[slots, kvh, r]` on the compute device (counted as moved); each later token's
  partial key is written there by the attention. A decode row then scores its context with the query
  (averaged over the query heads of each KV head) against the partial keys, and gathers from the host
  only the `fetch_count` best tokens per KV head (the recent `window` always among them, `keep_top`),
  attending over those. Prefill chunks attend in full, as per_seq does.
Bytes moved: host to device only (the per_seq strategies count the same direction); new tokens' K/V
written back to the host are not counted. On CPU the host tier and the compute device are the same
memory: the bytes are exact, the time is not a transfer's (the strategies' `notes` say so in every run).
No prefetch of the next layer on a side stream on CUDA: each layer's gathers are synchronous copies.
By default the pool is sized (`kv_cache_memory`) and accounted as full KV, as on the device, and
speculative_fetch's partial-key pool (`PartialKeyStore.partial`, r / (2 head_dim) of it) sits beside it.
With `kv_host_memory` the host tier is that large and `kv_cache_memory` bounds only what stays on the device
(`device_token_bytes`: speculative_fetch's partial keys, nothing for offloaded), as a GPU's memory would be
counted: more requests then fit the same cap. The pool's byte counts (`PoolUsage`) are still full KV: they
are the host tier's.

Neither evicts. Prefix caching stays on for `offloaded`; speculative_fetch turns it off, since a slot's
partial key holds the channels of the request that wrote it, which a request sharing the block would not
score with. Swap preemption is refused for speculative_fetch (the swapped blocks would resume into slots
whose partial keys are another request's); recompute preemption picks the channels again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.serve.attention import SingleGroup
from kvbench.serve.kv import KV, KVStore, StoreShape
from kvbench.serve.policies import POLICIES, PagedPolicy, PolicyState
from kvbench.serve.runner import StepInputs
from kvbench.serve.scheduler import Row
from kvbench.strategies.eviction import keep_top
from kvbench.strategies.speculative import fetch_count


class HostTierStore(KVStore):
    """The pool's K/V in host memory; `gather` / `gather_heads` bring what they read to `device`, and
    `bytes_moved` counts every byte brought (K and V of each slot read, per layer)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, torch.device("cpu"))
        if device.type == "cuda":
            self.k, self.v = [t.pin_memory() for t in self.k], [t.pin_memory() for t in self.v]
        self.device = device
        self.head_bytes = head_dim * 2 * self.k[0].element_size()  # K and V of one token of one KV head
        self.bytes_moved = 0

    def write(self, layer, slots, keys, values):
        super().write(layer, slots.cpu(), keys.cpu(), values.cpu())

    def gather(self, layer, index):
        keys, values = super().gather(layer, index.cpu())
        self.bytes_moved += index.numel() * self.k[0].shape[2] * self.head_bytes
        return keys.to(self.device), values.to(self.device)

    def gather_heads(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V `[..., kvh, k, d]` of slots `index` `[..., kvh, k]`, each KV head its own slots."""
        k_pool, v_pool = self.flat(layer)  # [slots, kvh, d]
        kvh, d = k_pool.shape[1:]
        flat = (index.cpu() * kvh + torch.arange(kvh)[:, None]).flatten()  # rows of the [slots * kvh, d] view
        self.bytes_moved += index.numel() * self.head_bytes
        return tuple(pool.view(-1, d).index_select(0, flat).view(*index.shape, d).to(self.device)
                     for pool in (k_pool, v_pool))


class PartialKeyStore(HostTierStore):
    """A host tier plus, on the compute device, `r` key channels of every slot: `partial[layer]` `[slots, kvh, r]`."""

    def __init__(self, r: int, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)
        self.r = r
        self.partial = [torch.zeros((self.num_slots, kv_heads, r), dtype=dtype, device=device)
                        for _ in range(num_layers)]

    def upload_partial(self, slots: torch.Tensor) -> torch.Tensor:
        """Pick each layer's channels `[kvh, r]` from the host keys of `slots` (a request's whole prompt: the
        largest mean |k|) and put those channels of their keys in the partial pool (counted as moved).
        Returns the channels `[layers, kvh, r]` on the device."""
        picked = []
        for layer in range(len(self.k)):
            keys = self.flat(layer)[0].index_select(0, slots.cpu()).transpose(0, 1)  # [kvh, P, d]
            chosen = keys.abs().mean(dim=1).topk(self.r, dim=-1).indices  # [kvh, r]
            partial = keys.gather(-1, chosen[:, None].expand(-1, keys.shape[1], -1)).transpose(0, 1)
            self.partial[layer].index_copy_(0, slots.to(self.device), partial.to(self.device))
            self.bytes_moved += partial.numel() * partial.element_size()
            picked.append(chosen)
        return torch.stack(picked).to(self.device)


@dataclass
class FetchStep:
    """One step's picks for the single-token rows (`StepContext.fetch`), row i of the packed order:
    `lengths[i]` context entries, `counts[i]` fetched per KV head (== length: the whole context), and the
    request's `channels` `[layers, kvh, r]` (None before its prefill is complete: no partial key written).
    `fetched[i]` counts the (token, KV head) pairs gathered for row i over the layers."""

    store: HostTierStore
    slots: torch.Tensor  # [num_single]: where each single row's new token is written
    lengths: list[int]
    counts: list[int]
    channels: list[torch.Tensor | None]
    window: int = 0
    fetched: list[int] = field(init=False)

    def __post_init__(self):
        self.fetched = [0] * len(self.lengths)

    def __call__(self, layer: int, g: SingleGroup, q: torch.Tensor, new_keys: torch.Tensor):
        """K/V `[Bg, kvh, K, d]` of each row's picked tokens (padded on the device to the group's most) and
        the mask. Rows read whole in one gather; rows fetching a subset are scored in batches of one length."""
        self._write_partial(layer, g, new_keys)
        lengths, counts = self.lengths[g.r0:g.r1], self.counts[g.r0:g.r1]
        width, device = max(counts), q.device
        parts = []  # (rows of the group, their K, their V: [m, kvh, k, d])
        whole = [b for b in range(len(counts)) if counts[b] == lengths[b]]
        if whole:
            parts.append((whole, *self._whole(layer, g, whole, lengths, width)))
        batches: dict[int, list[int]] = {}
        for b in range(len(counts)):
            if counts[b] < lengths[b]:
                batches.setdefault(lengths[b], []).append(b)
        for length, batch in batches.items():
            rows, count = torch.tensor(batch, device=device), counts[batch[0]]
            context = g.index[rows, :length]  # [m, L]
            channels = torch.stack([self.channels[g.r0 + b][layer] for b in batch])  # [m, kvh, r]
            approx = approximate_scores(self.store.partial[layer][context], q[rows], channels)  # [m, kvh, L]
            pick = keep_top(approx, min(self.window, count), count)  # [m, kvh, count] entries, ascending
            parts.append((batch, *self.store.gather_heads(layer, context.gather(1, pick.flatten(1)).view(pick.shape))))
            for b in batch:
                self.fetched[g.r0 + b] += pick[0].numel()
        if len(parts) == 1 and parts[0][1].shape[2] == width:  # one kind of row: already padded to the width
            keys, values = parts[0][1:]
        else:
            _, k, _ = parts[0]
            keys = k.new_zeros((len(counts), k.shape[1], width, k.shape[3]))
            values = torch.zeros_like(keys)
            for rows, k, v in parts:
                for j, b in enumerate(rows):
                    keys[b, :, :k.shape[2]], values[b, :, :k.shape[2]] = k[j], v[j]
        mask = None
        if min(counts) < width:
            span = torch.arange(width, device=device)
            mask = (span[None] < torch.tensor(counts, device=device)[:, None])[:, None, None]
        return keys, values, mask

    def _whole(self, layer: int, g: SingleGroup, rows: list[int], lengths: list[int], width: int):
        """K/V `[m, kvh, width, d]` of `rows`' whole contexts: their slots moved once, without padding, then
        laid out `width` wide on the device (past a row's length: repeats of its last entry, masked)."""
        k, v = self.store.gather(layer, torch.cat([g.index[b, :lengths[b]] for b in rows]))  # [sum L, kvh, d]
        for b in rows:
            self.fetched[g.r0 + b] += k.shape[1] * lengths[b]
        device = k.device
        sizes = torch.tensor([lengths[b] for b in rows], device=device)
        starts = sizes.cumsum(0) - sizes
        span = torch.arange(width, device=device)
        position = (starts[:, None] + torch.minimum(span[None], sizes[:, None] - 1)).flatten()
        return tuple(t.index_select(0, position).view(len(rows), width, *t.shape[1:]).transpose(1, 2) for t in (k, v))

    def _write_partial(self, layer: int, g: SingleGroup, new_keys: torch.Tensor) -> None:
        rows = [b for b, i in enumerate(range(g.r0, g.r1)) if self.channels[i] is not None]
        if not rows:
            return
        chosen = torch.stack([self.channels[g.r0 + b][layer] for b in rows])  # [m, kvh, r]
        index = torch.tensor(rows, device=new_keys.device)
        partial = new_keys.index_select(0, index).gather(-1, chosen)
        self.store.partial[layer].index_copy_(0, self.slots[g.r0 + index], partial)


def approximate_scores(partial: torch.Tensor, q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """`[..., kvh, L]`: partial keys `[..., L, kvh, r]` dotted with q `[..., kvh, group, d]` averaged over the
    group, on `channels` `[..., kvh, r]` (the per_seq layer's computation, in the same order)."""
    q_partial = q.mean(dim=-2).gather(-1, channels)  # [..., kvh, r]
    return (partial.transpose(-3, -2) * q_partial.unsqueeze(-2)).sum(-1)


class OffloadPolicy(PagedPolicy):
    """`offloaded`: the host tier, every context fetched whole. Subclasses pick less per decode row."""

    evicts = False
    caches_prefixes = True
    host_tier = True

    def __init__(self, strategy, block_size):
        self.strategy, self.block_size, self.budget, self.window = strategy, block_size, None, 0
        self._moved_before = 0  # the store's count when the step began
        self._uploaded: dict[int, int] = {}  # request id -> partial-key bytes uploaded this step

    def check(self, prompt_len, max_tokens):
        return None

    def device_token_bytes(self, shape: StoreShape) -> int:
        """Bytes per token kept on the compute device under `kv_host_memory`: none (only each step's working
        set), so the pool is as large as the host tier."""
        return 0

    def make_store(self, config, shape):
        return HostTierStore(*shape.args)

    def count(self, row: Row, length: int) -> int:
        """Tokens fetched per KV head for a single row over `length` entries."""
        return length

    def instrument(self, inputs: StepInputs) -> StepInputs:
        ctx = inputs.ctx
        lengths = [row.entry + 1 for row in inputs.singles]
        fetch = FetchStep(ctx.store, ctx.slot_mapping[:ctx.num_single], lengths,
                          [self.count(row, n) for row, n in zip(inputs.singles, lengths)],
                          [self.channels(row) for row in inputs.singles], self.window)
        self._moved_before = ctx.store.bytes_moved
        return dataclasses.replace(inputs, ctx=dataclasses.replace(ctx, fetch=fetch))

    def channels(self, row: Row) -> torch.Tensor | None:
        return None

    def evict(self, request, state, kv, boundary):
        return None  # nothing is dropped

    def after_step(self, rows: list[Row], inputs: StepInputs, kv: KV) -> None:
        """Check the step fetched what it had to, through the store; add each request's bytes to its count."""
        store, ctx = kv.store, inputs.ctx
        fetch, layers = ctx.fetch, len(store.k)
        kvh = store.k[0].shape[2]
        moved = {}
        for i, row in enumerate(inputs.singles):
            expected = layers * kvh * fetch.counts[i]
            if fetch.fetched[i] != expected:
                raise NotEngaged(f"{self.strategy.name}: a decode row fetched {fetch.fetched[i]} (token, KV head) pairs "
                                 f"through its host tier where it should have {expected} ({fetch.counts[i]} of "
                                 f"{fetch.lengths[i]} entries per KV head and layer); the attention read around it. "
                                 "If transformers changed how attention is called, use a tested version (kvbench env)")
            moved[row.request.request_id] = fetch.fetched[i] * store.head_bytes
        for chunk, row in zip(ctx.chunks, inputs.chunks):
            gathered = chunk.slots.numel() if chunk.mask is not None else 0  # no past: attends its own new K/V
            moved[row.request.request_id] = layers * kvh * gathered * store.head_bytes
        super().after_step(rows, inputs, kv)  # the step that completes a prefill uploads partial keys (subclass)
        moved.update({rid: moved.get(rid, 0) + b for rid, b in self._uploaded.items()})
        self._uploaded = {}
        counted = store.bytes_moved - self._moved_before
        if counted != sum(moved.values()):
            raise NotEngaged(f"{self.strategy.name}: the host tier counted {counted} bytes moved this step where "
                             f"the step's reads add up to {sum(moved.values())}; the attention read around it")
        for row in rows:
            request = row.request
            request.bytes_moved = (request.bytes_moved or 0) + moved.get(request.request_id, 0)


class SpeculativeFetchPolicy(OffloadPolicy):
    """`speculative_fetch`: decode rows of requests past their prefill fetch `fetch_count` tokens per KV head."""

    caches_prefixes = False

    def __init__(self, strategy, block_size):
        super().__init__(strategy, block_size)
        self.budget, self.window = strategy.budget, strategy.window

    def check(self, prompt_len, max_tokens):
        PagedPolicy.check(self, prompt_len, max_tokens)

    def device_token_bytes(self, shape: StoreShape) -> int:
        """Its partial keys: `partial_channels` key channels per layer and KV head."""
        r = min(self.strategy.partial_channels, shape.head_dim)
        return shape.layers * shape.kv_heads * r * torch.empty((), dtype=shape.dtype).element_size()

    @classmethod
    def check_config(cls, strategy, config):
        if config.preemption == "swap":
            raise KvbenchError("speculative_fetch keeps partial keys per slot, which a swapped request would not find "
                               "in the blocks it resumes into; use preemption recompute")

    def make_store(self, config, shape):
        return PartialKeyStore(min(self.strategy.partial_channels, shape.head_dim), *shape.args)

    def channels(self, row):
        state = row.request.policy_state
        return state.channels if state is not None and state.decoding else None

    def count(self, row, length):
        if self.channels(row) is None:  # a prefill row: the whole context
            return length
        return fetch_count(self.budget, self.strategy.window, length)

    def evict(self, request, state: PolicyState, kv, boundary):
        """Nothing is dropped; the step that completes the prefill picks the request's channels."""
        if not boundary:
            return
        before = kv.store.bytes_moved
        slots = torch.tensor(kv.pool.slots(request.request_id, 0, request.num_entries))
        state.channels = kv.store.upload_partial(slots)
        self._uploaded[request.request_id] = kv.store.bytes_moved - before


POLICIES.update({"offloaded": OffloadPolicy, "speculative_fetch": SpeculativeFetchPolicy})
