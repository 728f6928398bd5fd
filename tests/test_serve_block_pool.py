"""The paged block pool: invariants under random operations, prefix hits confirmed by tokens, LRU eviction."""

import random

import pytest

from kvbench.reuse import blocks as chain
from kvbench.reuse.blocks import Namespace
from kvbench.serve.block_pool import BlockPool

NS = Namespace("model-a", "float32", 4)


def _pool(num_blocks=16, caching=True):
    return BlockPool(num_blocks, 4, token_bytes=10, namespace=NS if caching else None)


def _run(pool, request_id, tokens):
    """Admit with the prefix hit, compute every token, as the engine does; returns the hit tokens."""
    matched = pool.match_prefix(tokens)
    pool.admit(request_id, matched)
    assert pool.ensure(request_id, len(tokens))
    pool.commit(request_id, tokens, len(matched) * 4, len(tokens), [])
    return len(matched) * 4


def test_prefix_hit_shares_blocks_and_is_capped_one_token_short():
    pool = _pool()
    prompt = list(range(12))
    assert _run(pool, 0, prompt) == 0
    assert _run(pool, 1, prompt + [99, 98]) == 12  # three full blocks shared
    assert pool.tables[1][:3] == pool.tables[0]
    assert [pool.refs[b] for b in pool.tables[0]] == [2, 2, 2]
    assert len(pool.match_prefix(prompt)) == 2  # the same prompt again: its last token must be computed
    usage = pool.usage()
    assert (usage.used, usage.cached, usage.free) == (4, 0, 12)
    assert usage.tokens_held == 14 and usage.bytes_used == 140
    pool.check()


def test_released_blocks_stay_cached_and_are_evicted_in_lru_order():
    pool = _pool(num_blocks=4)
    a, b = list(range(8)), list(range(100, 108))
    _run(pool, 0, a)
    pool.release(0)
    _run(pool, 1, b)
    pool.release(1)
    assert pool.usage().cached == 4
    assert _run(pool, 2, a + [7]) == 8  # a hit on cached blocks revives them
    pool.release(2)
    pool.admit(3, [])
    assert pool.ensure(3, 8)  # two blocks: b's, the least recently released, are evicted first
    assert len(pool.match_prefix(b + [1])) == 0 and len(pool.match_prefix(a + [1])) == 2
    pool.check()


def test_a_forced_key_collision_is_rejected_by_the_token_check(monkeypatch):
    real = chain.extend_chain
    monkeypatch.setattr(chain, "extend_chain", lambda previous, tokens, ns: real(previous, [0] * len(tokens), ns))
    pool = _pool()
    _run(pool, 0, list(range(8)))
    other = list(range(50, 58)) + [1]
    assert chain.chain_keys(other[:8], NS)[0] in pool._block_of  # the fake keys collide...
    assert pool.match_prefix(other) == []  # ...but the tokens differ, so nothing is shared
    assert _run(pool, 1, other) == 0
    pool.check()


def test_ensure_fails_without_change_and_promises_hold_blocks_back():
    pool = _pool(num_blocks=4)
    pool.admit(0, [], promise_tokens=12)  # three blocks promised
    assert pool.available == 1
    pool.admit(1, [])
    assert not pool.ensure(1, 8) and pool.tables[1] == []
    assert pool.ensure(1, 4)
    assert pool.ensure(0, 12)  # the promise is kept
    assert pool.available == 0 and pool.usage().promised == 0
    pool.check()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("caching", [True, False])
def test_invariants_hold_under_random_operations(seed, caching):
    rng = random.Random(seed)
    pool = _pool(num_blocks=24, caching=caching)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 13))] for _ in range(3)]
    live: dict[int, list[int]] = {}
    for request_id in range(200):
        if live and rng.random() < 0.4:
            done = rng.choice(sorted(live))
            pool.release(done)
            del live[done]
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            matched = pool.match_prefix(tokens)
            if pool.admission_cost(matched, len(tokens)) > pool.available:
                continue
            pool.admit(request_id, matched)
            assert pool.ensure(request_id, len(tokens))
            pool.commit(request_id, tokens, len(matched) * 4, len(tokens), [])
            live[request_id] = tokens
        pool.check()
        usage = pool.usage()
        assert usage.used + usage.cached + usage.free == usage.total
        assert usage.tokens_held <= usage.used * 4
