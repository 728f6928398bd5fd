"""KV policies native to the paged pool: `EngineConfig(kv_backend="paged", strategy=...)`.

Each is the paged version of the kvbench strategy of the same name, built from that strategy's own
parameters (parsed as the CLI parses them), so `sink:budget=0.25` keeps the same share of the tokens seen
(prompt and generated, `kvbench.strategies.budget.capacity`) on both backends. The differences are the
pool's: eviction is block-granular where it frees blocks, and head- and layer-agnostic, since a slot holds
one token for every layer and KV head (evicting a token frees it everywhere). Scores are the attention
mass summed over layers and KV heads (averaged over the query heads of a KV head), taken inside the paged
attention function, never by recomputing queries.

- `sink`: the first `sink_tokens` rounded up to whole blocks stay; when a request's entries exceed its
  budget by at least a block, whole middle blocks leave its table and return to the pool, nothing copied.
- `h2o`: mass accumulated over every query (prefill chunks and decode steps); once the prompt is
  computed, the entries over the budget go, and then again whenever they exceed it by a block: the
  `window` most recent and the heaviest of the rest are kept.
- `snapkv`: the mass of the prompt's last `window` queries, max-pooled over `kernel` neighbours, picks
  the prompt entries kept at the prefill/decode boundary; decoded tokens are all kept.
h2o and snapkv compact the kept entries to the front of the request's own blocks (one gather and
scatter per layer, in batches) and release the blocks past them. The policies that evict nothing live
beside the store they need and register themselves here: `quantized` (`kvbench.serve.quant_blocks`: full
blocks past the sink blocks and out of the `residual` window quantized KIVI-style into an arena of codes
and scales, the group being the block; admission counts bytes), `offloaded` and `speculative_fetch`
(`kvbench.serve.fetch`: the pool in a host tier).

A policy acts once a request's prefill is complete (the per_seq strategies see a prompt whole), so its
whole prompt is held while it prefills. Prefix caching stays on only for a policy whose blocks are plain
prefix KV (`caches_prefixes`: offloaded): a table whose entries are not its first positions is no prefix,
and a quantized block or a slot's partial key is not what its key names to another request. `POLICIES` maps a strategy name to the factory of its policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.reuse.blocks import Namespace
from kvbench.serve.block_pool import BlockPool
from kvbench.serve.kv import KVStore, StoreShape
from kvbench.serve.runner import StepInputs, context_slots
from kvbench.serve.scheduler import Row
from kvbench.strategies.base import CacheStrategy
from kvbench.strategies.budget import capacity
from kvbench.strategies.eviction import keep_top

if TYPE_CHECKING:
    from kvbench.serve.attention import StepContext
    from kvbench.serve.config import EngineConfig
    from kvbench.serve.kv import KV
    from kvbench.serve.request import Request


def strategy_of(config: EngineConfig) -> CacheStrategy:
    from kvbench.bench.suite import parse_strategy

    return parse_strategy(config.strategy).build()


def check_config(config: EngineConfig) -> None:
    """Refuse, in one line, a paged strategy without a native policy (called by `EngineConfig`)."""
    strategy = strategy_of(config)
    if strategy.name not in POLICIES:
        raise KvbenchError(f"strategy {strategy.name!r} has no paged version (paged runs {', '.join(POLICIES)}); "
                           "set kv_backend: per_seq to run it")
    if config.kv_host_memory is not None and not POLICIES[strategy.name].host_tier:
        raise KvbenchError(f"{strategy.name} keeps its pool on the compute device: kv_host_memory applies to "
                           "offloaded and speculative_fetch only; drop it")
    POLICIES[strategy.name].check_config(strategy, config)


def make_policy(config: EngineConfig) -> PagedPolicy | None:
    if config.kv_backend != "paged" or config.strategy is None:
        return None
    strategy = strategy_of(config)
    return POLICIES[strategy.name](strategy, config.block_size)


@dataclass
class PolicyState:
    """A request's bookkeeping (`Request.policy_state`): whether its prefill is done, and the attention
    mass of each of its entries so far (score policies; None until scored)."""

    decoding: bool = False
    mass: torch.Tensor | None = None  # [entries] float32
    channels: torch.Tensor | None = None  # speculative_fetch: [layers, kvh, r] key channels it scores with

    def add(self, mass: torch.Tensor) -> None:
        if self.mass is None:
            self.mass = mass.clone()
        else:
            self.mass = F.pad(self.mass, (0, mass.shape[0] - self.mass.shape[0])) + mass

    def mass_of(self, entries: int) -> torch.Tensor:
        return F.pad(self.mass, (0, entries - self.mass.shape[0]))


class PagedPolicy:
    """Base: acts after each step on the requests whose prefill is done. Subclasses set `evict`, and
    `mass_queries` when they score."""

    evicts: ClassVar[bool] = True
    caches_prefixes: ClassVar[bool] = False  # whether its requests' full blocks may be shared as cached prefixes
    host_tier: ClassVar[bool] = False  # True: its pool lives in a host tier (`kv_host_memory`; `device_token_bytes`)

    def __init__(self, strategy: CacheStrategy, block_size: int):
        self.strategy, self.block_size, self.budget = strategy, block_size, strategy.budget

    def make_pool_and_store(self, config: EngineConfig, shape: StoreShape, token_bytes: int,
                            namespace: Namespace | None) -> tuple[BlockPool, KVStore]:
        """The pool and store this policy runs on (`kv.make_kv`): a plain pool and `make_store`'s store; a policy
        whose blocks are not all alike (quantized) returns its own pool too."""
        return BlockPool(shape.num_blocks, shape.block_size, token_bytes, namespace), self.make_store(config, shape)

    def make_store(self, config: EngineConfig, shape: StoreShape) -> KVStore:
        """The store of the pool's K/V; a policy whose KV lives elsewhere (a host tier) returns its own."""
        return KVStore(*shape.args)

    @classmethod
    def check_config(cls, strategy: CacheStrategy, config: EngineConfig) -> None:
        """Refuse, in one line, an engine configuration this policy cannot run under."""

    def protected(self) -> int:
        """Entries always kept (window, sink blocks)."""
        return self.strategy.protected()

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a prompt the budget cannot shrink past what is always kept (as the per_seq strategy does)."""
        kept = capacity(self.budget, prompt_len)
        if kept < prompt_len and kept <= self.protected():
            raise KvbenchError(
                f"{self.strategy.name}: budget {self.budget} keeps {kept} of a {prompt_len}-token prompt, not more "
                f"than the {self.protected()} tokens it always keeps on the paged pool (window, or sink tokens in "
                f"whole {self.block_size}-token blocks); raise the budget or lower the window / sink_tokens")

    def mass_queries(self, row: Row) -> int:
        """How many of the row's last queries have their attention mass taken (0: none)."""
        return 0

    def instrument(self, inputs: StepInputs) -> StepInputs:
        """Give the step's attention the buffers that the mass of the scored rows is added to."""
        singles, chunks = inputs.singles, inputs.chunks
        ctx = inputs.ctx
        single_mass = None
        if any(self.mass_queries(r) for r in singles):
            single_mass = torch.zeros((ctx.num_single, ctx.single_width), dtype=torch.float32,
                                      device=ctx.slot_mapping.device)
        packed = []
        for chunk, row in zip(ctx.chunks, chunks):
            n = self.mass_queries(row)
            mass = torch.zeros(chunk.slots.shape, dtype=torch.float32, device=chunk.slots.device) if n else None
            packed.append(dataclasses.replace(chunk, mass=mass, mass_queries=n))
        return dataclasses.replace(inputs, ctx=dataclasses.replace(ctx, chunks=tuple(packed), single_mass=single_mass))

    def after_step(self, rows: list[Row], inputs: StepInputs, kv: KV) -> None:
        """Add the step's mass to its requests' entries; evict from requests whose prefill is done."""
        singles, chunks = inputs.singles, inputs.chunks
        ctx, emitted = inputs.ctx, {r.request.request_id for r in inputs.emitting}
        masses = {}
        if ctx.single_mass is not None:
            masses = {r.request.request_id: ctx.single_mass[i, :r.entry + 1] for i, r in enumerate(singles)
                      if self.mass_queries(r)}
        masses.update({r.request.request_id: c.mass for c, r in zip(ctx.chunks, chunks) if c.mass is not None})
        _check_scored(ctx, kv)
        for row in rows:
            request = row.request
            if request.finished:
                continue
            state = request.policy_state = request.policy_state or PolicyState()
            if request.request_id in masses:
                state.add(masses[request.request_id])
            emits = request.request_id in emitted  # (row.emits no longer holds: its token was appended)
            boundary = not state.decoding and emits
            state.decoding = state.decoding or emits
            if state.decoding:
                self.evict(request, state, kv, boundary)

    def evict(self, request: Request, state: PolicyState, kv: KV, boundary: bool) -> None:
        """Drop what the budget no longer holds; `boundary`: the step that completed the prefill."""
        raise NotImplementedError

    def compact(self, request: Request, state: PolicyState, kv: KV, kept: torch.Tensor) -> None:
        """Keep entries `kept` (ascending): moved to the front of the request's own blocks, whose tail
        blocks are then released. Entries already in place are not copied."""
        pool, entries, m = kv.pool, request.num_entries, kept.numel()
        device = kv.store.k[0].device
        table = torch.tensor(pool.tables[request.request_id], device=device)
        kept = kept.to(device)
        displaced = (kept != torch.arange(m, device=device)).nonzero()
        if displaced.numel():
            first = int(displaced[0])
            kv.store.move(context_slots(table, kept[first:], self.block_size),
                          context_slots(table, torch.arange(first, m, device=device), self.block_size))
        keep_blocks = pool.blocks_for(m)
        pool.drop(request.request_id, keep_blocks, len(table) - keep_blocks, m)
        request.num_evicted += entries - m
        if state.mass is not None:
            state.mass = state.mass_of(entries)[kept.to(state.mass.device)]


class SinkPolicy(PagedPolicy):
    def __init__(self, strategy: CacheStrategy, block_size: int):
        super().__init__(strategy, block_size)
        self.sink_blocks = -(-strategy.sink_tokens // block_size)

    def protected(self) -> int:
        return self.sink_blocks * self.block_size

    def evict(self, request, state, kv, boundary):
        over = request.num_entries - capacity(self.budget, request.num_computed)
        table = kv.pool.tables[request.request_id]
        drop = min(over // self.block_size, len(table) - self.sink_blocks - 1)  # the last block stays
        if drop > 0:
            kv.pool.drop(request.request_id, self.sink_blocks, drop, request.num_entries - drop * self.block_size)
            request.num_evicted += drop * self.block_size


class H2OPolicy(PagedPolicy):
    def mass_queries(self, row):
        return row.n

    def evict(self, request, state, kv, boundary):
        entries, cap = request.num_entries, capacity(self.budget, request.num_computed)
        if entries - cap < (1 if boundary else self.block_size):  # after the prefill every excess entry goes
            return
        window = min(self.strategy.window, cap)
        self.compact(request, state, kv, keep_top(state.mass_of(entries)[None, None], window, cap)[0, 0])


class SnapKVPolicy(PagedPolicy):
    def mass_queries(self, row):
        state = row.request.policy_state
        if state is not None and state.decoding:
            return 0
        prompt = row.request.num_tokens  # what this prefill computes (prompt and any recomputed output)
        first = prompt - min(self.strategy.window, prompt)
        return max(0, row.start + row.n - max(row.start, first))

    def evict(self, request, state, kv, boundary):
        if not boundary:
            return
        prompt = request.num_entries
        kept = capacity(self.budget, prompt)
        if kept < prompt:
            kernel = self.strategy.kernel
            pooled = F.max_pool1d(state.mass_of(prompt)[None, None], kernel_size=kernel, stride=1,
                                  padding=kernel // 2)
            self.compact(request, state, kv, keep_top(pooled, min(self.strategy.window, prompt), kept)[0, 0])
        state.mass = None  # decoded tokens are all kept: no more scores


POLICIES: dict[str, type[PagedPolicy]] = {
    "sink": SinkPolicy,
    "h2o": H2OPolicy,
    "snapkv": SnapKVPolicy,
}


def _check_scored(ctx: StepContext, kv: KV) -> None:
    """Every scored query's probabilities sum to one per KV head and layer, so the buffers must hold
    exactly queries x KV heads x layers: anything else means the attention never scored them."""
    total, queries = 0.0, 0
    if ctx.single_mass is not None:
        total, queries = float(ctx.single_mass.sum()), ctx.num_single
    for chunk in ctx.chunks:
        if chunk.mass is not None:
            total, queries = total + float(chunk.mass.sum()), queries + chunk.mass_queries
    expected = queries * len(kv.store.k) * kv.store.k[0].shape[2]
    if abs(total - expected) > 1e-3 * max(1, expected):
        raise NotEngaged(f"the paged attention scored {total:.1f} of {expected} query-head-layers this step; the "
                         "policy would evict on missing scores. If transformers changed how attention is called, "
                         "use a tested version (kvbench env)")


import kvbench.serve.fetch  # noqa: E402, I001  registers offloaded and speculative_fetch (subclasses of PagedPolicy)
import kvbench.serve.quant_blocks  # noqa: E402  registers quantized
