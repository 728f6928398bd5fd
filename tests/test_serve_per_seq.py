"""The per_seq backend on the tiny model: every registered strategy, served with continuous batching
(mixed lengths, staggered arrivals), gives each request the tokens that strategy gives it through
`kvbench.engine.generate()` at batch 1; the step log's KV bytes are the caches' exact bytes."""

import random

import pytest

from kvbench.strategies.budget import capacity

from kvbench.bench.suite import parse_strategy
from kvbench.engine import GenerationConfig, generate
from kvbench.errors import KvbenchError
from kvbench.serve import Engine, EngineConfig, SamplingParams, per_seq
from kvbench.strategies import STRATEGIES

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
# Settings that run on the tiny model (head_dim 16) and make every lossy mechanism act on these prompts.
SETTINGS = {
    "quantized": "quantized:group_size=16:residual=8",
    "hf_quantized": "hf_quantized:backend=fp8",
    "sink": "sink:budget=0.5",
    "h2o": "h2o:budget=0.5:window=4",
    "snapkv": "snapkv:budget=0.5:window=4",
    "speculative_fetch": "speculative_fetch:budget=0.5:window=4",
}
LOSSLESS = {"dynamic", "static", "offloaded", "no_cache"}
_references: dict = {}


def _prompts(seed=0, lengths=(40, 17, 64, 25, 9, 33)):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


def _reference(lm, strategy: str, prompt: list[int]) -> list[int]:
    key = (strategy, tuple(prompt))
    if key not in _references:
        config = GenerationConfig(max_new_tokens=MAX_TOKENS, stop_at_eos=False)
        _references[key] = generate(lm, parse_strategy(strategy).build(), [prompt], config).tokens[0]
    return _references[key]


@pytest.fixture
def rows_seen(monkeypatch):
    """Every row a per_seq step ran: (request id, start, n)."""
    seen = []
    prepare = per_seq.prepare

    def recording(rows, pool, caches, device):
        seen.extend((r.request.request_id, r.start, r.n) for r in rows)
        return prepare(rows, pool, caches, device)

    monkeypatch.setattr(per_seq, "prepare", recording)
    return seen


def _step(engine) -> None:
    """One step, then the step log's bytes against the live caches' own count."""
    engine.step()
    engine.kv.pool.check()
    if engine.step_log:
        strategy, caches = engine.kv.store.strategy, engine.kv.store.caches
        assert engine.step_log[-1].kv_bytes_used == sum(strategy.kv_bytes(c) for c in caches.values())
        assert engine.step_log[-1].kv_bytes_reserved >= engine.step_log[-1].kv_bytes_used
    ledger = engine.kv.pool  # each request's share: its cache's bytes rounded up to whole tokens of full KV
    expected = {r: -(-engine.kv.store.nbytes(r) // ledger.token_bytes) for r in ledger.held}
    assert ledger.held == expected and ledger.usage().used == sum(expected.values())


def test_every_strategy_is_covered():
    assert set(STRATEGIES.names()) == LOSSLESS | set(SETTINGS)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_per_seq_tokens_equal_the_strategy_through_generate(tiny, rows_seen, name):
    strategy = SETTINGS.get(name, name)
    prompts = _prompts()
    engine = Engine(tiny, EngineConfig(kv_backend="per_seq", strategy=strategy, max_num_batched_tokens=48))
    token_bytes = tiny.kv_bytes_per_token
    ids, evicted, fetched = [], False, False
    now = engine.now()
    for i, prompt in enumerate(prompts):  # some join while others run, the last two scheduled for later
        arrival = now + 0.02 * (i - 3) if i >= 4 else None
        ids.append(engine.add_request(prompt, GREEDY, arrival_s=arrival))
        if i % 2:
            _step(engine)
    while engine.has_work():  # (steps before the later arrivals are due run nothing)
        _step(engine)
        for request_id, cache in engine.kv.store.caches.items():
            computed = engine.requests[request_id].num_computed
            evicted |= engine.kv.store.strategy.kv_bytes(cache) < computed * token_bytes
            fetched |= cache is not None and any(getattr(layer, "partial_steps", 0) for layer in cache.layers)
    requests = [engine.requests[i] for i in ids]
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, strategy, prompt), f"{strategy}: request {request.request_id}"
    # every growth fit the share ensured before the step (token_bytes_bound is an upper bound), but static's
    # preallocation of prompt + max_tokens in its first step
    assert (engine.kv.pool.overruns > 0) == (name == "static")
    assert max(s.num_running for s in engine.step_log) > 1  # requests really ran side by side
    assert not engine.kv.store.caches and engine.kv.pool.usage().used == 0  # every cache freed at the end
    prompt_rows = {}  # request id -> the sizes of the rows that computed its prompt
    for request_id, start, n in rows_seen:
        if start < len(engine.requests[request_id].prompt_ids):
            prompt_rows.setdefault(request_id, []).append(n)
    if name in LOSSLESS - {"no_cache"}:  # the 64-token prompt over a 48-token budget was prefilled in chunks
        assert max(len(sizes) for sizes in prompt_rows.values()) > 1
    else:  # lossy strategies (and no_cache) take each prompt whole, as generate() does
        assert all(prompt_rows[r.request_id] == [len(r.prompt_ids)] for r in requests)
    if name in SETTINGS and name != "speculative_fetch":
        assert evicted  # a cache held less than full KV of its tokens: the mechanism acted
    if name == "speculative_fetch":
        assert fetched  # decode steps fetched a subset of the offloaded KV


def test_reserve_admission_holds_the_cap_and_optimistic_preempts(tiny):
    prompts = _prompts(seed=1, lengths=(40, 40, 40, 40))
    cap = 125 * tiny.kv_bytes_per_token  # full KV of three prompts (120 tokens), not of three requests (141)
    for admission in ("reserve", "optimistic"):
        config = EngineConfig(kv_backend="per_seq", kv_cache_memory=cap, admission=admission, watermark=0.0)
        engine = Engine(tiny, config)
        requests = engine.generate(prompts, GREEDY)
        for prompt, request in zip(prompts, requests):
            assert request.output_ids == _reference(tiny, "dynamic", prompt)
        preemptions = sum(r.preemptions for r in requests)
        if admission == "reserve":  # two fit with their whole reservation, never a third
            assert max(s.num_running for s in engine.step_log) == 2 and preemptions == 0
            assert max(s.kv_bytes_reserved for s in engine.step_log) <= config.kv_cache_memory
        else:  # three start, and growth preempts one (its cache dropped, recomputed exactly)
            assert max(s.num_running for s in engine.step_log) == 3 and preemptions > 0


def test_abort_frees_the_cache_and_its_bytes(tiny):
    engine = Engine(tiny, EngineConfig(kv_backend="per_seq", strategy="h2o:budget=0.5:window=4"))
    ids = [engine.add_request(p, GREEDY) for p in _prompts()[:3]]
    _step(engine)
    _step(engine)
    before = engine.step_log[-1].kv_bytes_used
    dropped = engine.kv.pool.caches.nbytes(ids[1])
    assert dropped > 0
    engine.abort(ids[1])
    assert ids[1] not in engine.kv.store.caches and ids[1] not in engine.kv.pool.held
    assert engine.kv.pool.usage().bytes_used == before - dropped
    _step(engine)
    engine.run_until_idle()
    assert engine.requests[ids[1]].finish_reason.value == "abort"
    assert engine.requests[ids[0]].output_ids == _reference(tiny, "h2o:budget=0.5:window=4", _prompts()[0])
    assert engine.kv.pool.usage().used == 0 and engine.kv.pool.usage().bytes_used == 0


def _peak_running(tiny, strategy: str, prompts, cap_tokens: int) -> tuple[int, list]:
    config = EngineConfig(kv_backend="per_seq", strategy=strategy, kv_cache_memory=cap_tokens * tiny.kv_bytes_per_token,
                          watermark=0.0)
    engine = Engine(tiny, config)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_work():
        _step(engine)
    return max(s.num_running for s in engine.step_log), [engine.requests[i] for i in ids]


def test_admission_counts_real_bytes_so_eviction_admits_more_and_fetch_fewer(tiny):
    prompts = _prompts(seed=2, lengths=(64,) * 8)
    cap = 160  # tokens of full KV: two 64-token prompts at full size, not three
    full, _ = _peak_running(tiny, "dynamic", prompts, cap)
    evicting, requests = _peak_running(tiny, "h2o:budget=0.25:window=4", prompts, cap)
    fetching, _ = _peak_running(tiny, "speculative_fetch:budget=0.25:window=4", prompts, 2 * 64 + 12)
    assert full == 2 and evicting > full  # h2o's caches shrink to a quarter after prefill: more requests fit
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, "h2o:budget=0.25:window=4", prompt)
    # speculative_fetch's partial keys are extra: two prompts at full KV + 12 tokens fit, not at its bound
    assert fetching == 1


def test_reserve_promise_covers_the_bound_and_returns_what_the_cache_frees(tiny):
    engine = Engine(tiny, EngineConfig(kv_backend="per_seq", strategy="h2o:budget=0.25:window=4", admission="reserve"))
    [request_id] = [engine.add_request(_prompts(seed=3, lengths=(64,))[0], GREEDY)]
    ledger = engine.kv.pool
    _step(engine)  # prefill: 64 tokens seen, a quarter kept
    bound = engine.requests[request_id].max_total_tokens  # prompt + max_tokens - 1 (the last token is never fed)
    assert ledger.held[request_id] < 64 and ledger.held[request_id] + ledger.promised[request_id] == bound
    engine.run_until_idle()
    assert ledger.usage().used == 0 and ledger.usage().promised == 0


def _token_bytes_per_layer(tiny) -> int:
    return tiny.kv_bytes_per_token // tiny.config.num_hidden_layers


@pytest.mark.parametrize("strategy", ["offloaded", "speculative_fetch:budget=0.25:window=4", "dynamic"])
def test_bytes_moved_per_request_are_exact(tiny, strategy):
    prompts = _prompts(seed=4, lengths=(40, 64))
    engine = Engine(tiny, EngineConfig(kv_backend="per_seq", strategy=strategy))
    requests = engine.generate(prompts, GREEDY)
    for request in requests:
        p, decodes = len(request.prompt_ids), len(request.output_ids) - 1
        if strategy == "dynamic":
            assert request.bytes_moved is None
        elif strategy == "offloaded":  # each decode step brings every layer's stored KV in
            assert request.bytes_moved == tiny.kv_bytes_per_token * sum(p + j for j in range(decodes))
        else:  # each decode step fetches its budget's top tokens (at least window + 1) of the n held
            fetched = sum(min(n, max(capacity(0.25, n), 5)) for n in range(p + 1, p + 1 + decodes))
            assert request.bytes_moved == tiny.kv_bytes_per_token * fetched


@pytest.mark.parametrize("fields, message", [
    ({"kv_backend": "per_seq", "strategy": "nope"}, "unknown strategy 'nope'; valid: dynamic"),
    ({"kv_backend": "per_seq", "strategy": "h2o:budget=1.5"}, r"budget 1.5 as a fraction must be in \(0, 1\]"),
    ({"kv_backend": "per_seq", "strategy": "h2o:budget"}, "write name:key=value"),
    ({"kv_backend": "contiguous", "strategy": "h2o"}, "needs kv_backend per_seq"),
    ({"kv_backend": "paged", "strategy": "hf_quantized:backend=fp8"}, "no paged version .*set kv_backend: per_seq"),
    ({"kv_backend": "per_seq", "num_blocks": 8}, "size it with kv_cache_memory"),
    ({"kv_backend": "per_seq", "preemption": "swap"}, "use preemption recompute or admission reserve"),
])
def test_bad_per_seq_configs_fail_in_one_line(fields, message):
    with pytest.raises(KvbenchError, match=message) as error:
        EngineConfig(**fields)
    assert "\n" not in str(error.value)


def test_a_request_the_strategy_cannot_serve_is_refused_when_added(tiny):
    engine = Engine(tiny, EngineConfig(kv_backend="per_seq", strategy="h2o:budget=0.5:window=4"))
    with pytest.raises(KvbenchError, match="keeps 3 of a 6-token prompt") as error:
        engine.add_request(list(range(6)), GREEDY)
    assert "\n" not in str(error.value) and not engine.requests
