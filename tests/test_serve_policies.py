"""KV policies native to the paged pool (`kvbench.serve.policies`) on the tiny model: under continuous
batching the pool's invariants hold after every step, its memory is bounded by the budget exactly, the
eviction really happens, a budget of 1.0 changes no token, and kept KV is the KV of the kept tokens."""

import random

import pytest
import torch

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.serve import Engine, EngineConfig, SamplingParams, attention
from kvbench.serve.policies import PolicyState
from kvbench.strategies.budget import capacity

POLICIES = ["sink", "h2o", "snapkv"]
BS = 16


def _prompts(seed=0, lengths=(70, 130, 96, 81, 150, 100)):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


def _serve(lm, config, prompts, max_tokens=40, on_step=None):
    """Add the prompts while others already run; returns the engine and the requests in prompt order."""
    engine = Engine(lm, config)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = []
    for i, prompt in enumerate(prompts):
        ids.append(engine.add_request(prompt, sampling))
        if i % 2:
            engine.step()
            engine.kv.pool.check()
    while engine.has_work():
        engine.step()
        engine.kv.pool.check()
        if on_step:
            on_step(engine)
    assert engine.kv.pool.usage().used == 0
    return engine, [engine.requests[i] for i in ids]


def _config(strategy=None, **fields):
    fields = {"num_blocks": 256, "block_size": BS, "max_num_batched_tokens": 64, "max_num_seqs": 4, **fields}
    return EngineConfig(strategy=strategy, **fields)


def test_a_strategy_without_paged_version_is_refused_and_evicting_turns_prefix_caching_off(tiny):
    with pytest.raises(KvbenchError, match="no paged version .*set kv_backend: per_seq"):
        EngineConfig(strategy="hf_quantized:backend=fp8")
    with pytest.raises(KvbenchError, match="unknown strategy|valid"):
        EngineConfig(strategy="h20")
    with pytest.raises(KvbenchError, match="needs kv_backend per_seq"):
        EngineConfig(kv_backend="contiguous", strategy="sink")
    assert Engine(tiny, _config("sink")).kv.pool.namespace is None
    assert Engine(tiny, _config()).kv.pool.namespace is not None


def test_a_prompt_the_budget_cannot_shrink_is_refused(tiny):
    engine = Engine(tiny, _config("sink:budget=0.5:sink_tokens=4"))
    with pytest.raises(KvbenchError, match="keeps 12 of a 24-token prompt, not more than the 16 tokens"):
        engine.add_request(list(range(24)), SamplingParams(max_tokens=4))


@pytest.mark.parametrize("name", POLICIES)
def test_budget_one_evicts_nothing_and_equals_the_plain_paged_engine(tiny, name):
    prompts = _prompts()
    _, plain = _serve(tiny, _config(), prompts)
    _, kept = _serve(tiny, _config(f"{name}:budget=1.0"), prompts)
    assert [r.output_ids for r in kept] == [r.output_ids for r in plain]
    assert all(r.num_evicted == 0 for r in kept)


def _bounded(name, budget):
    """A check, after every step, that every decoding request holds exactly the entries its budget allows,
    in exactly as many blocks, and that the pool's used bytes are those entries."""
    peaks = []

    def check(engine):
        pool, total_entries = engine.kv.pool, 0
        for request in engine.scheduler.running:
            entries, table = request.num_entries, pool.tables[request.request_id]
            total_entries += entries
            assert len(table) == pool.blocks_for(entries)
            state = request.policy_state
            if state is None or not state.decoding:
                continue
            cap = capacity(budget, request.num_computed)
            if name == "snapkv":
                prompt = request.num_computed - len(request.output_ids) + 1  # computed: all but the last output
                assert entries == min(prompt, capacity(budget, prompt)) + request.num_computed - prompt
            else:  # sink drops whole blocks, h2o compacts to the budget: both stay within a block of it
                assert cap <= entries < cap + BS
        usage = pool.usage()
        assert usage.used == sum(len(pool.tables[r.request_id]) for r in engine.scheduler.running)
        assert usage.bytes_used == total_entries * pool.token_bytes
        peaks.append(usage.used)

    return check, peaks


@pytest.mark.parametrize("name", POLICIES)
def test_policies_evict_and_bound_memory_exactly_under_continuous_batching(tiny, name):
    prompts = _prompts()
    plain, _ = _serve(tiny, _config(), prompts)
    check, peaks = _bounded(name, 0.5)
    engine, requests = _serve(tiny, _config(f"{name}:budget=0.5"), prompts, on_step=check)
    assert max(s.num_running for s in engine.step_log) > 1
    for request in requests:  # every request evicted what its budget left out, no more
        total = request.num_tokens - 1
        if name == "snapkv":
            assert request.num_evicted == len(request.prompt_ids) - capacity(0.5, len(request.prompt_ids))
        else:
            assert 0 <= total - capacity(0.5, total) - request.num_evicted < BS
    assert max(s.blocks_used for s in engine.step_log) < max(s.blocks_used for s in plain.step_log)


def test_sink_equals_per_seq_when_they_keep_the_same_tokens(tiny):
    """Sinks of one whole block and a prompt excess of whole blocks: both backends keep the same tokens
    (until per_seq's decode slack or the pool's next block), so the tokens must be equal: the kept KV,
    its positions and the entries' attention are exact."""
    prompts = _prompts(lengths=(96, 112, 80))
    strategy = "sink:budget=64:sink_tokens=16"
    _, paged = _serve(tiny, _config(strategy), prompts, max_tokens=15)
    _, per_seq = _serve(tiny, EngineConfig(kv_backend="per_seq", strategy=strategy, max_num_batched_tokens=64,
                                           max_num_seqs=4), prompts, max_tokens=15)
    assert [r.num_evicted for r in paged] == [32, 48, 16]
    assert [r.output_ids for r in paged] == [r.output_ids for r in per_seq]


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_policies_survive_preemption(tiny, preemption):
    """A pool too small for every request: preempted requests are recomputed (their evictions forgotten)
    or swapped (their entries kept), and the budget still bounds every step."""
    check, _ = _bounded("h2o", 0.5)
    engine, requests = _serve(tiny, _config("h2o:budget=0.5", num_blocks=14, preemption=preemption),
                              _prompts(), on_step=check)
    assert sum(r.preemptions for r in requests) > 0
    assert all(len(r.output_ids) == 40 for r in requests)


def test_compaction_moves_the_kept_entries_kv_to_the_front_and_frees_the_rest(tiny):
    engine = Engine(tiny, _config("h2o:budget=1.0", max_num_batched_tokens=128))
    request_id = engine.add_request(list(range(100)), SamplingParams(max_tokens=2))
    engine.step()  # its prefill: 100 entries in 7 blocks
    request = engine.requests[request_id]
    pool, store = engine.kv.pool, engine.kv.store
    slots = pool.slots(request_id, 0, 100)
    for layer in range(len(store.k)):
        for t in store.flat(layer):
            t[slots] = torch.arange(100, dtype=t.dtype)[:, None, None] + layer  # each entry's KV: its position
    kept = torch.tensor([0, 3, 4, 50, 51, 99])
    free = pool.usage().free
    state = PolicyState(decoding=True, mass=torch.arange(100, dtype=torch.float32))
    engine.kv.policy.compact(request, state, engine.kv, kept)
    assert request.num_evicted == 94 and len(pool.tables[request_id]) == 1
    assert pool.usage().free == free + 6 and pool.usage().tokens_held == 6
    for layer in range(len(store.k)):
        for t in store.flat(layer):
            assert t[pool.slots(request_id, 0, 6), 0, 0].tolist() == (kept + layer).tolist()
    assert state.mass.tolist() == kept.tolist()


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_missing_scores_fail_the_step(tiny, monkeypatch, name):
    """The scores are proven taken: every scored query adds one per KV head and layer to the buffers."""
    monkeypatch.setattr(attention, "query_mass", lambda q, keys, *a, **k: torch.zeros(1, keys.shape[1], keys.shape[2]))
    engine = Engine(tiny, _config(f"{name}:budget=0.5"))
    engine.add_request(list(range(100)), SamplingParams(max_tokens=4))
    with pytest.raises(NotEngaged, match="scored 0.0 of"):
        while engine.has_work():
            engine.step()


@pytest.mark.slow
@pytest.mark.parametrize("name", POLICIES)
def test_paged_policies_agree_with_per_seq(tiny, name, capsys):
    """Informational: block granularity and head-agnostic eviction differ from per_seq by design, so only
    the agreement is reported (the recorded benchmark measures it on the embedded model)."""
    prompts = _prompts(lengths=(200, 256, 180))
    strategy = f"{name}:budget=0.5"
    _, paged = _serve(tiny, _config(strategy), prompts, max_tokens=32)
    _, per_seq = _serve(tiny, EngineConfig(kv_backend="per_seq", strategy=strategy, max_num_seqs=4), prompts,
                        max_tokens=32)
    same = [sum(a == b for a, b in zip(p.output_ids, s.output_ids)) / 32 for p, s in zip(paged, per_seq)]
    with capsys.disabled():
        print(f"\n{strategy}: paged vs per_seq greedy agreement per request {same}")
    assert all(r.num_evicted > 0 for r in paged)
