"""The `per_seq` backend: every request holds its own cache of a kvbench strategy (dynamic, quantized, sink,
h2o, snapkv, offloaded, speculative_fetch...), exactly as `kvbench.engine.generate()` builds it at batch 1,
so every strategy runs under the engine's continuous batching (arrivals, admission, preemption, abort)
and is the reference the paged versions of the strategies are checked against.

The forward of a step is one `model_runner.forward` per scheduled request, with that request's cache and
the strategy's hooks attached, the same call `generate()` makes: scheduling is continuous, compute is
not batched. It is exact by construction for every strategy; batching the linear layers over the packed
row (attention per sequence in a registered attention function) is the faster design left for later.

Memory: admission and growth are accounted in a token ledger against `kv_cache_memory`, in units of one
token's full KV. Each request counts its cache's actual bytes (`strategy.kv_bytes` after each of its
steps, rounded up to whole units) plus, for the step being planned, the worst-case growth of the tokens it
computes (`strategy.token_bytes_bound` per token: full KV, or more for speculative_fetch's partial keys).
So eviction and quantization admit more requests under a cap, and speculative_fetch fewer. `static`
allocates prompt + max_tokens in its first step, ahead of its tokens: the step after, its share is its
actual bytes, so it can run over `kv_cache_memory` by that allocation (counted in `TokenLedger.overruns`). Reserve
admission sets aside the bound of prompt + max_tokens up front (full size per token: eviction strategies
give no tighter bound yet). The bytes reported per step are exact: `strategy.kv_bytes` of every live cache
(used), and per request its share plus its promise (reserved).

Ignored here: `block_size`, and prefix caching (`enable_prefix_caching`; a strategy's cache is not a set
of shareable blocks). Prompts are prefilled in chunks only for lossless strategies that keep a cache
(dynamic, static, offloaded); every other one (lossy strategies decide at the prefill/decode boundary or
per step, such as snapkv's compression of the whole prompt; no_cache recomputes everything) takes its
prompt whole in one step, as `generate()` does. A request preempted by recompute starts a fresh cache
and prefills prompt + generated tokens at once, which a lossy strategy compresses differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.bench.suite import parse_strategy
from kvbench.engine import model_runner
from kvbench.errors import KvbenchError
from kvbench.serve.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig
from kvbench.serve.kv import KV
from kvbench.serve.request import Request
from kvbench.serve.scheduler import Row
from kvbench.strategies.base import CacheStrategy

DEFAULT_STRATEGY = "dynamic"


def check_config(config: EngineConfig) -> None:
    """Refuse a per_seq configuration that cannot run, in one line (called by `EngineConfig`)."""
    strategy_of(config)
    if config.num_blocks is not None:
        raise KvbenchError("num_blocks has no meaning for kv_backend per_seq (no blocks: each request holds a "
                           "strategy cache); size it with kv_cache_memory")
    if config.preemption == "swap":
        raise KvbenchError("preemption swap copies pool blocks, and kv_backend per_seq has none (each request holds a "
                           "strategy cache); use preemption recompute or admission reserve")


def strategy_of(config: EngineConfig) -> CacheStrategy:
    """The strategy `config` names, read by the CLI's parser (`name` or `name:key=value:...`)."""
    return parse_strategy(config.strategy or DEFAULT_STRATEGY).build()


class SeqCaches:
    """The live caches, one per running request, and the strategy that makes and hooks them."""

    def __init__(self, lm, strategy: CacheStrategy):
        self.lm, self.strategy = lm, strategy
        self.caches: dict[int, object] = {}
        self.requests: dict[int, Request] = {}  # each live cache's request, which its bytes moved are added to

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse, when it is added, a request the strategy cannot serve (a prompt too short for its
        budget, a head_dim its groups do not divide, a missing package): making its cache raises."""
        self.strategy.make_cache(self.lm, 1, prompt_len, max_tokens)

    def open(self, request: Request) -> None:
        """A fresh cache for a request starting from its first token (admission, or after preemption)."""
        self.caches[request.request_id] = self.strategy.make_cache(
            self.lm, 1, len(request.prompt_ids), request.params.max_tokens)
        self.requests[request.request_id] = request

    def drop(self, request_id: int) -> None:
        """Forget the request's cache, adding the bytes it moved (offload, fetch) to the request's count."""
        cache, request = self.caches.pop(request_id, None), self.requests.pop(request_id, None)
        moved = self.strategy.bytes_moved(cache)
        if request is not None and moved is not None:
            request.bytes_moved = (request.bytes_moved or 0) + moved

    def nbytes(self, request_id: int) -> int:
        return self.strategy.kv_bytes(self.caches.get(request_id))

    @torch.inference_mode()
    def forward(self, row: Row, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The last position's logits `[1, vocab]` of one request's rows, through `generate()`'s call."""
        cache = self.caches[row.request.request_id]
        uses_cache = self.strategy.capabilities.uses_cache
        with self.strategy.attach(self.lm, cache):
            logits = model_runner.forward(self.lm.model, ids, cache=cache if uses_cache else None,
                                          positions=positions)[:, -1]
        self.strategy.check_engaged(cache)  # its mechanism must hold after every step, not only at the end
        return logits


@dataclass(frozen=True)
class LedgerUsage:
    """`BlockPool.usage()`'s fields for per_seq: the "blocks" are ledger tokens of full-KV size; the bytes
    are exact, from the caches."""

    total: int
    used: int
    cached: int
    free: int
    promised: int
    bytes_used: int
    bytes_reserved: int


class TokenLedger:
    """The scheduler's pool interface, counted in tokens of full KV (one "block" = one token's full-KV bytes,
    never shared). A request's share is its cache's actual bytes after its last step, rounded up to whole
    tokens (`commit`), plus, while a step is planned, the worst-case growth of the tokens it computes
    (`ensure`: `token_bound` bytes each). Reserve admission promises the bound of prompt + max_tokens,
    and a request's share plus its promise never falls below it (`commit` moves what the cache frees back
    into the promise), so it can always grow. `release` drops the request's cache with its share."""

    block_size = 1

    def __init__(self, num_tokens: int, token_bytes: int, token_bound: int, caches: SeqCaches):
        self.num_blocks, self.token_bytes, self.token_bound, self.caches = num_tokens, token_bytes, token_bound, caches
        self.held: dict[int, int] = {}  # ledger tokens counted for the request now
        self.promised: dict[int, int] = {}
        self.reserved: dict[int, int] = {}  # reserve admission: the bound of prompt + max_tokens, else 0
        self.computed: dict[int, int] = {}  # tokens its cache has seen (through its last commit)
        self.bytes: dict[int, int] = {}  # its cache's bytes after its last step
        self.overruns = 0  # steps after which a cache held more than its share had room for (static preallocates)

    def blocks_for(self, num_tokens: int) -> int:
        """Ledger tokens that `num_tokens` new tokens may take at most."""
        return -(-num_tokens * self.token_bound // self.token_bytes)

    @property
    def available(self) -> int:
        return self.num_blocks - sum(self.held.values()) - sum(self.promised.values())

    def match_prefix(self, tokens: list[int]) -> list[int]:
        return []  # no prefix caching: a strategy's cache is not a set of shareable blocks

    def admission_cost(self, matched: list[int], num_tokens: int) -> int:
        return self.blocks_for(num_tokens)

    def admit(self, request_id: int, matched: list[int], promise_tokens: int = 0) -> None:
        if request_id in self.held:
            raise KvbenchError(f"request {request_id} already holds a cache")
        self.held[request_id], self.computed[request_id], self.bytes[request_id] = 0, 0, 0
        self.promised[request_id] = self.reserved[request_id] = self.blocks_for(promise_tokens)

    def ensure(self, request_id: int, num_tokens: int) -> bool:
        """Hold the request's bytes plus the worst-case growth of its tokens up to `num_tokens`."""
        new = max(0, num_tokens - self.computed[request_id])
        need = -(-(self.bytes[request_id] + new * self.token_bound) // self.token_bytes)
        missing = need - self.held[request_id]
        own = self.promised[request_id]
        if missing > self.available + min(own, missing):
            return False
        if missing > 0:
            self.held[request_id] += missing
            self.promised[request_id] = max(0, own - missing)
        return True

    def commit(self, request_id: int, tokens: list[int], start: int, end: int, keys: list[str]) -> None:
        """After the request's forward: its share becomes its cache's bytes, rounded up to whole tokens; what
        that frees returns to its promise (reserve admission) or to the pool."""
        size = self.caches.nbytes(request_id)
        actual = -(-size // self.token_bytes)
        self.overruns += actual > self.held[request_id]
        self.promised[request_id] = max(0, self.reserved[request_id] - actual)
        self.held[request_id], self.computed[request_id], self.bytes[request_id] = actual, end, size

    def release(self, request_id: int) -> None:
        for book in (self.held, self.promised, self.reserved, self.computed, self.bytes):
            del book[request_id]
        self.caches.drop(request_id)

    def usage(self) -> LedgerUsage:
        used, promised = sum(self.held.values()), sum(self.promised.values())
        sizes = {r: self.caches.nbytes(r) for r in self.held}
        reserved = sum(max((self.held[r] + self.promised[r]) * self.token_bytes, b) for r, b in sizes.items())
        return LedgerUsage(self.num_blocks, used, 0, self.num_blocks - used, promised, sum(sizes.values()), reserved)

    def check(self) -> None:
        """Assert the invariants (for tests and debugging)."""
        assert all(n >= 0 for n in (*self.held.values(), *self.promised.values()))
        assert self.available >= 0, "more tokens held and promised than the ledger has"
        assert set(self.caches.caches) <= set(self.held), "a cache outlived its request's share"
        for r, size in self.bytes.items():
            assert self.held[r] * self.token_bytes >= size, f"request {r} holds more bytes than its share"


def make_kv(lm, config: EngineConfig, max_model_len: int) -> KV:
    strategy = strategy_of(config)
    token_bytes = lm.kv_bytes_per_token
    num_tokens = (config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY) // token_bytes
    if num_tokens < 1:
        raise KvbenchError(f"kv_cache_memory holds not one token of full KV ({token_bytes} bytes); raise it")
    caches = SeqCaches(lm, strategy)
    chunkable = strategy.capabilities.lossless and strategy.capabilities.uses_cache
    ledger = TokenLedger(num_tokens, token_bytes, strategy.token_bytes_bound(lm), caches)
    return KV("per_seq", ledger, caches, max_model_len, chunkable)


@dataclass(frozen=True)
class SeqInputs:
    rows: list[tuple[Row, torch.Tensor, torch.Tensor]]  # each row with its ids and positions [1, n]
    emitting: list[Row]  # the rows whose logits are sampled, in row order
    caches: SeqCaches


def prepare(rows: list[Row], pool: TokenLedger, caches: SeqCaches, device: torch.device) -> SeqInputs:
    """Each row's ids and positions; a row from a request's first token opens its cache. A strategy that
    keeps no cache gets the whole sequence so far, as `generate()` recomputes it."""
    prepared = []
    for row in rows:
        if row.start == 0:
            caches.open(row.request)
        start = row.start if caches.strategy.capabilities.uses_cache else 0
        end = row.start + row.n
        ids = torch.tensor([row.request.tokens[start:end]], device=device)
        prepared.append((row, ids, torch.arange(start, end, device=device)[None]))
    return SeqInputs(prepared, [row for row in rows if row.emits], caches)


def run_model(model, inputs: SeqInputs) -> torch.Tensor:
    """Logits `[E, vocab]` of the emitting rows: one forward per request, each with its own cache."""
    logits = [inputs.caches.forward(row, ids, positions) for row, ids, positions in inputs.rows]
    kept = [x for x, (row, _, _) in zip(logits, inputs.rows) if row.emits]
    return torch.cat(kept) if kept else torch.empty(0, model.config.vocab_size)
