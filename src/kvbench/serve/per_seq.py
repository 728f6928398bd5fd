"""The `per_seq` backend: every request holds its own cache of a kvbench strategy (dynamic, quantized, sink,
h2o, snapkv, offloaded, speculative_fetch...), exactly as `kvbench.engine.generate()` builds it at batch 1,
so every strategy runs under the engine's continuous batching (arrivals, admission, preemption, abort)
and is the reference the paged versions of the strategies are checked against.

The forward of a step is one `model_runner.forward` per scheduled request, with that request's cache and
the strategy's hooks attached, the same call `generate()` makes: scheduling is continuous, compute is
not batched. It is exact by construction for every strategy; batching the linear layers over the packed
row (attention per sequence in a registered attention function) is the faster design left for later.

Memory: admission and growth are accounted in a token ledger of full-KV size per token (what preflight
estimates), against `kv_cache_memory`; reserve admission sets aside prompt + max_tokens up front. The
bytes reported per step are exact: `strategy.kv_bytes` of every live cache (used), and per request the
larger of its ledger share and its cache (reserved); a strategy that holds more than full KV
(speculative_fetch's partial keys) can therefore exceed `kv_cache_memory` by that surplus, and the
reserved bytes show it. Eviction and quantization shrink the bytes used, not admission, which stays
conservative.

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

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse, when it is added, a request the strategy cannot serve (a prompt too short for its
        budget, a head_dim its groups do not divide, a missing package): making its cache raises."""
        self.strategy.make_cache(self.lm, 1, prompt_len, max_tokens)

    def open(self, request: Request) -> None:
        """A fresh cache for a request starting from its first token (admission, or after preemption)."""
        self.caches[request.request_id] = self.strategy.make_cache(
            self.lm, 1, len(request.prompt_ids), request.params.max_tokens)

    def drop(self, request_id: int) -> None:
        self.caches.pop(request_id, None)

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
    """The scheduler's pool interface, counted in tokens of full KV (one "block" = one token, never
    shared): `ensure` grows a request's share, reserve admission promises prompt + max_tokens, and
    `release` drops the request's cache with its share."""

    block_size = 1

    def __init__(self, num_tokens: int, token_bytes: int, caches: SeqCaches):
        self.num_blocks, self.token_bytes, self.caches = num_tokens, token_bytes, caches
        self.held: dict[int, int] = {}
        self.promised: dict[int, int] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return num_tokens

    @property
    def available(self) -> int:
        return self.num_blocks - sum(self.held.values()) - sum(self.promised.values())

    def match_prefix(self, tokens: list[int]) -> list[int]:
        return []  # no prefix caching: a strategy's cache is not a set of shareable blocks

    def admission_cost(self, matched: list[int], num_tokens: int) -> int:
        return num_tokens

    def admit(self, request_id: int, matched: list[int], promise_tokens: int = 0) -> None:
        if request_id in self.held:
            raise KvbenchError(f"request {request_id} already holds a cache")
        self.held[request_id], self.promised[request_id] = 0, promise_tokens

    def ensure(self, request_id: int, num_tokens: int) -> bool:
        missing = num_tokens - self.held[request_id]
        own = self.promised[request_id]
        if missing > self.available + min(own, missing):
            return False
        if missing > 0:
            self.held[request_id] += missing
            self.promised[request_id] = max(0, own - missing)
        return True

    def commit(self, *_) -> None:
        """Nothing to key: the cache took the tokens in the forward."""

    def release(self, request_id: int) -> None:
        del self.held[request_id], self.promised[request_id]
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


def make_kv(lm, config: EngineConfig, max_model_len: int) -> KV:
    strategy = strategy_of(config)
    token_bytes = lm.kv_bytes_per_token
    num_tokens = (config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY) // token_bytes
    if num_tokens < 1:
        raise KvbenchError(f"kv_cache_memory holds not one token of full KV ({token_bytes} bytes); raise it")
    caches = SeqCaches(lm, strategy)
    chunkable = strategy.capabilities.lossless and strategy.capabilities.uses_cache
    return KV("per_seq", TokenLedger(num_tokens, token_bytes, caches), caches, max_model_len, chunkable)


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
