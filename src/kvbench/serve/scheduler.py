"""Which requests run in the next forward, and how many tokens each computes.

FCFS under two limits per step: `max_num_batched_tokens` (tokens in the forward) and `max_num_seqs`
(running requests). Running requests go first, in arrival order: one token each when decoding, the
next chunk when prefilling. Then waiting requests are admitted while the budget, the sequence limit and
the pool allow. Without chunked prefill a prompt runs whole in one step (alone if it exceeds the budget).

Admission:
- `optimistic` (vLLM): a request is admitted when the pool has blocks for its next chunk plus a
  watermark. When a running request cannot grow, the newest running request is preempted: its blocks
  are released (full ones stay cached, so its prefix is usually a hit again) and it waits at the front
  of the queue to be recomputed.
- `reserve` (TensorRT-LLM's GUARANTEED_NO_EVICT): admitted only when prompt + max_tokens fit; never preempts.

Preemption by `swap` copies the victim's blocks to the host tier instead (`swap.HostTier`; recompute
when the tier is full) and releases them. Swapped requests resume first, before any waiting request is
admitted, when the pool holds their KV again (plus the watermark beside running requests); nothing is
recomputed. As with recompute, nothing resumes or is admitted in a step that preempted.

With a spill (`kvbench.serve.spill`), admission continues a prompt's prefix hits in the reuse store: the
blocks found there count as computed, are read once the request is admitted, and are copied into the
blocks allocated for them (a block that fails its check then is computed instead).

Batching `static` admits a new batch only when no request runs; a batch whose prompts overran one
step's token budget keeps filling in the next steps, up to `max_num_seqs`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvbench.errors import KvbenchError
from kvbench.serve.block_pool import BlockPool
from kvbench.serve.config import EngineConfig
from kvbench.serve.request import Request, Status
from kvbench.serve.swap import HostTier

if TYPE_CHECKING:
    from kvbench.serve.spill import PoolSpill


@dataclass(frozen=True)
class Row:
    """One request's share of a step: compute tokens [start, start + n); `emits` when that reaches the
    end of its tokens, so the last row's logits give its next token."""

    request: Request
    start: int
    n: int

    @property
    def emits(self) -> bool:
        return self.start + self.n == self.request.num_tokens

    @property
    def entry(self) -> int:
        """The table entry token `start` is written to (its position less the tokens its request evicted)."""
        return self.start - self.request.num_evicted


@dataclass
class StepPlan:
    rows: list[Row] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # by recompute or swap
    swapped_out: list[Request] = field(default_factory=list)
    swapped_in: list[Request] = field(default_factory=list)
    bytes_swapped: int = 0  # out and in

    @property
    def num_tokens(self) -> int:
        return sum(r.n for r in self.rows)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, max_model_len: int, host: HostTier | None = None,
                 spill: PoolSpill | None = None):
        """host: the tier swap preemption copies into; None preempts by recompute. spill: the reuse store
        that prefix hits continue in; None: the pool's only."""
        self.config, self.pool, self.max_model_len, self.host = config, pool, max_model_len, host
        self.spill = spill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self._filling = False  # static batching: the batch admitted last step is still filling
        self.watermark_blocks = int(config.watermark * pool.num_blocks)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request that could never run: longer than the model or than the whole pool."""
        total = prompt_len + max_tokens - 1
        if prompt_len + max_tokens > self.max_model_len:
            raise KvbenchError(f"prompt of {prompt_len} tokens + {max_tokens} new tokens exceeds max_model_len "
                               f"{self.max_model_len}; shorten the prompt or lower max_tokens")
        if self.pool.blocks_for(total) > self.pool.num_blocks:
            raise KvbenchError(
                f"prompt of {prompt_len} tokens + {max_tokens} new tokens needs {self.pool.blocks_for(total)} KV "
                f"blocks but the pool has {self.pool.num_blocks}; raise kv_cache_memory or num_blocks, or shorten it")

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and release its blocks."""
        if request in self.running:
            self.running.remove(request)
            self.pool.release(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.swapped:
            self.swapped.remove(request)
            self.host.drop(request.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed, budget)
            while not self.pool.ensure(request.request_id, request.num_entries + n):
                if self.config.admission == "reserve":
                    raise AssertionError("a reserve-admitted request could not grow")
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is request:
                    break
            else:
                plan.rows.append(Row(request, request.num_computed, n))
                budget -= n
                i += 1
        if not plan.preempted:
            budget = self._resume(plan, budget)
            if not self.swapped:
                self._admit(plan, budget)
        return plan

    def _resume(self, plan: StepPlan, budget: int) -> int:
        """Swap the swapped requests back in, first come first: fresh blocks, their KV copied back into
        them and committed (counted and keyed like computed KV). Returns the budget left."""
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.swapped[0]
            n = min(request.num_tokens - request.num_computed, budget)
            watermark = self.watermark_blocks if self.running else 0
            if self.pool.admission_cost([], request.num_entries + n) + watermark > self.pool.available:
                break
            self.swapped.popleft()
            self.pool.admit(request.request_id, [])
            ensured = self.pool.ensure(request.request_id, request.num_entries + n)
            assert ensured, "resumption checked the blocks"
            held = self.pool.tables[request.request_id][:self.pool.blocks_for(request.num_entries)]
            moved = self.host.swap_in(request.request_id, held)
            request.block_keys = []
            self.pool.commit(request.request_id, request.tokens, 0, request.num_entries, request.block_keys)
            request.bytes_swapped += moved
            plan.bytes_swapped += moved
            plan.swapped_in.append(request)
            request.status = Status.RUNNING
            self.running.append(request)
            plan.rows.append(Row(request, request.num_computed, n))
            budget -= n
        return budget

    def _admit(self, plan: StepPlan, budget: int) -> None:
        static = self.config.batching == "static"
        if static and self.running and not self._filling:
            return
        over_budget = False
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            if budget <= 0:
                over_budget = True
                break
            request = self.waiting[0]
            matched = self.pool.match_prefix(request.tokens)
            spilled = self.spill.find(request.tokens, len(matched)) if self.spill else []
            computed = (len(matched) + len(spilled)) * self.pool.block_size
            n = self._chunk(request.num_tokens - computed, budget)
            if not self.config.chunked_prefill and n > budget and plan.rows:
                over_budget = True  # a whole prompt over the budget waits to run alone
                break
            if self.config.admission == "reserve":
                promise = request.max_total_tokens
                ok = self.pool.admission_cost(matched, promise) <= self.pool.available
            else:
                promise = 0
                cost = self.pool.admission_cost(matched, computed + n)
                watermark = self.watermark_blocks if self.running else 0  # alone, a request may use the whole pool
                ok = cost + watermark <= self.pool.available
            if not ok:
                break
            self.waiting.popleft()
            loaded = self.spill.fetch(request.tokens, len(matched), spilled) if spilled else []
            if len(loaded) < len(spilled):  # one gone or failing its check since found: computed (no more blocks)
                computed = (len(matched) + len(loaded)) * self.pool.block_size
                n = self._chunk(request.num_tokens - computed, budget)
                if not self.config.chunked_prefill and n > budget and plan.rows:
                    self.waiting.appendleft(request)  # the whole prompt no longer fits this step: it waits again
                    over_budget = True
                    break
            self.pool.admit(request.request_id, matched, promise)
            request.block_keys = []
            request.num_computed = computed
            ensured = self.pool.ensure(request.request_id, computed + n)
            assert ensured, "admission checked the blocks"
            tiers = {"pool": len(matched) * self.pool.block_size}
            if loaded:
                table = self.pool.tables[request.request_id]
                tiers |= self.spill.load(table[len(matched):len(matched) + len(loaded)], loaded)
                self.pool.commit(request.request_id, request.tokens, tiers["pool"], computed, request.block_keys)
            if request.num_cached is None:
                request.num_cached = computed
                request.num_cached_by_tier = {tier: tokens for tier, tokens in tiers.items() if tokens}
            request.status = Status.RUNNING
            self.running.append(request)
            plan.rows.append(Row(request, computed, n))
            budget -= n
        self._filling = static and over_budget

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens of a newly admitted request's first row: all `remaining` unless prefill is chunked."""
        return min(remaining, budget) if self.config.chunked_prefill else remaining

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Swap the request's computed blocks out to the host tier, or (recompute, or the tier full)
        release them and queue the request first again."""
        self.running.remove(request)
        request.preemptions += 1
        plan.preempted.append(request)
        blocks = self.pool.tables[request.request_id][:self.pool.blocks_for(request.num_entries)] if self.host else []
        if self.host is not None and self.host.fits(len(blocks)):
            moved = self.host.swap_out(request.request_id, blocks)
            self.pool.release(request.request_id)
            request.swaps += 1
            request.bytes_swapped += moved
            plan.bytes_swapped += moved
            plan.swapped_out.append(request)
            request.status = Status.SWAPPED
            self.swapped.appendleft(request)
            return
        if self.host is not None:
            request.swap_refused += 1
        self.pool.release(request.request_id)
        request.preempted_tokens += request.num_computed
        request.num_computed = request.num_evicted = 0
        request.policy_state = None
        request.status = Status.WAITING
        self.waiting.appendleft(request)
