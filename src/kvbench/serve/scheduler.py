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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvbench.errors import KvbenchError
from kvbench.serve.block_pool import BlockPool
from kvbench.serve.config import EngineConfig
from kvbench.serve.request import Request, Status


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


@dataclass
class StepPlan:
    rows: list[Row] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.n for r in self.rows)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, max_model_len: int):
        self.config, self.pool, self.max_model_len = config, pool, max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
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

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed, budget)
            while not self.pool.ensure(request.request_id, request.num_computed + n):
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
            self._admit(plan, budget)
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            matched = self.pool.match_prefix(request.tokens)
            computed = len(matched) * self.pool.block_size
            n = request.num_tokens - computed
            if not self.config.chunked_prefill and n > budget and plan.rows:
                break  # a whole prompt over the budget waits to run alone
            n = n if not self.config.chunked_prefill else min(n, budget)
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
            self.pool.admit(request.request_id, matched, promise)
            request.block_keys = []
            request.num_computed = computed
            if request.num_cached is None:
                request.num_cached = computed
            ensured = self.pool.ensure(request.request_id, computed + n)
            assert ensured, "admission checked the blocks"
            request.status = Status.RUNNING
            self.running.append(request)
            plan.rows.append(Row(request, computed, n))
            budget -= n

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Recompute preemption: release the blocks and queue the request first again."""
        self.running.remove(request)
        self.pool.release(request.request_id)
        request.preempted_tokens += request.num_computed
        request.num_computed = 0
        request.preemptions += 1
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        plan.preempted.append(request)
