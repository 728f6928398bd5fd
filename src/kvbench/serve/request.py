"""A request and its life in the engine: tokens, progress, status and timeline."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kvbench.engine.sampling import SamplingConfig
from kvbench.errors import KvbenchError


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again (its KV freed: it recomputes)
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV copied to the host tier; resumes before waiting requests
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence token
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingParams:
    """What to generate: up to `max_tokens` tokens, greedy or seeded sampling (one generator per request,
    seeded as `kvbench.engine.generate` seeds its own, so a sampled request draws the same tokens)."""

    max_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise KvbenchError(f"max_tokens must be a positive whole number, got {self.max_tokens!r}")


@dataclass
class Timeline:
    """Engine-clock seconds. `arrival_s` is the scheduled arrival, so queueing behind a busy engine
    loop shows in the delays instead of being hidden (coordinated omission)."""

    arrival_s: float
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    token_s: list[float] = field(default_factory=list)
    end_s: float | None = None


@dataclass
class Request:
    """One request. Its tokens are `prompt_ids + output_ids`; the first `num_computed` of them have been
    computed, so the next forward computes `tokens[num_computed:]` (one token when decoding, a chunk of
    the prompt when prefilling, or everything again after a preemption).

    A KV policy (`kvbench.serve.policies`) may evict: then only `num_entries` = num_computed - num_evicted
    of them hold KV, as entries [0, num_entries) of its block table, in position order; a token at
    position p is written to entry p - num_evicted (its key rotated for p, so kept keys stay exact)."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    timeline: Timeline
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int | None = None  # prefix-cache hit tokens at first admission
    num_cached_by_tier: dict[str, int] | None = None  # num_cached by where they were: pool, ram, disk (spill)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    preemptions: int = 0  # by recompute or swap
    preempted_tokens: int = 0  # KV tokens dropped by recompute preemptions (recomputed unless still prefix-cached)
    swaps: int = 0  # preemptions by swap
    swap_refused: int = 0  # swap preemptions recomputed instead, the host tier being full
    bytes_swapped: int = 0  # out and back in
    bytes_moved: int | None = None  # per_seq offload / fetch strategies: KV brought to the compute device
    block_keys: list[str] = field(default_factory=list)  # chain keys of its full, computed blocks
    num_evicted: int = 0  # computed tokens whose KV a policy dropped (0 again when recomputed)
    policy_state: Any = None  # the KV policy's bookkeeping for this request's entries (reset when recomputed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_entries(self) -> int:
        """Tokens whose KV the pool holds for this request (its block table's filled entries)."""
        return self.num_computed - self.num_evicted

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def max_total_tokens(self) -> int:
        """Tokens whose KV the request may hold: the last generated token is never fed back."""
        return len(self.prompt_ids) + self.params.max_tokens - 1


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_output_tokens: int
    num_cached_tokens: int
