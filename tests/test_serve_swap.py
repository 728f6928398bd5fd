"""Swap preemption (KV copied to a host tier and back, nothing recomputed, exact bytes) and static
batching, on the tiny model: tokens equal `generate()`'s per request."""

import itertools

import pytest

from kvbench.errors import KvbenchError
from kvbench.serve import Engine, EngineConfig, SamplingParams, Status
from kvbench.serve.swap import HostTier
from test_serve_engine import GREEDY, _prompts, _reference, _serve, checked_slots  # noqa: F401 (a fixture)

SMALL_POOL = dict(block_size=4, num_blocks=30, max_num_batched_tokens=64, watermark=0.0, preemption="swap")


@pytest.fixture
def swaps(monkeypatch):
    """Record every swap: (direction, request id, blocks, tokens computed, a shared block among them, bytes)."""
    events, engines = [], []
    swap_out, swap_in, init = HostTier.swap_out, HostTier.swap_in, Engine.__init__

    def engine_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self)

    def record(direction, method):
        def spy(host, request_id, blocks):
            engine = engines[-1]
            shared = any(engine.kv.pool.refs[b] > 1 for b in blocks)
            moved = method(host, request_id, blocks)
            events.append((direction, request_id, len(blocks), engine.requests[request_id].num_computed, shared,
                           moved))
            assert host.budget is None or host.bytes_held <= host.budget
            return moved
        return spy

    monkeypatch.setattr(Engine, "__init__", engine_init)
    monkeypatch.setattr(HostTier, "swap_out", record("out", swap_out))
    monkeypatch.setattr(HostTier, "swap_in", record("in", swap_in))
    return events


def _block_bytes(lm, block_size):
    c = lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * c.num_key_value_heads * head_dim * 2 * 4 * block_size  # K and V, fp32


def test_swapped_requests_resume_without_recomputing_and_bytes_are_exact(tiny, checked_slots, swaps):
    prompts = _prompts(seed=1)
    engine, requests = _serve(tiny, EngineConfig(**SMALL_POOL), prompts, seed=1)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, prompt)
    outs = [e for e in swaps if e[0] == "out"]
    assert outs and sum(r.swaps for r in requests) == len(outs) == sum(s.swapped_out for s in engine.step_log)
    assert sum(r.preempted_tokens for r in requests) == 0  # nothing dropped, nothing recomputed
    assert any(shared for *_, shared, _ in outs)  # a prefix block shared with a running request was swapped
    block_bytes = _block_bytes(tiny, 4)
    for _, request_id, blocks, computed, _, moved in swaps:
        assert blocks == -(-computed // 4) and moved == blocks * block_bytes
    # what left comes back, block for block, to the same request with the same tokens computed
    assert sorted(e[1:4] for e in outs) == sorted(e[1:4] for e in swaps if e[0] == "in")
    total = sum(e[-1] for e in swaps)
    assert engine.host.bytes_swapped_out == engine.host.bytes_swapped_in == total // 2
    assert sum(s.bytes_swapped for s in engine.step_log) == sum(r.bytes_swapped for r in requests) == total
    assert engine.host.bytes_held == 0


def test_a_full_host_tier_falls_back_to_recompute(tiny, checked_slots, swaps):
    prompts = _prompts(seed=1)
    budget = 6 * _block_bytes(tiny, 4)
    engine, requests = _serve(tiny, EngineConfig(**SMALL_POOL, swap_space=budget), prompts, seed=1)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, prompt)
    refused = sum(r.swap_refused for r in requests)
    assert refused > 0 and sum(r.preempted_tokens for r in requests) > 0
    assert sum(r.preemptions for r in requests) == sum(r.swaps for r in requests) + refused
    assert all(e[2] <= 6 for e in swaps)


def test_aborting_a_swapped_request_frees_its_host_copy(tiny):
    engine = Engine(tiny, EngineConfig(**SMALL_POOL))
    ids = [engine.add_request(p, GREEDY) for p in _prompts(seed=1)]
    while not engine.scheduler.swapped:
        engine.step()
    victim = engine.scheduler.swapped[0]
    assert victim.status is Status.SWAPPED and engine.host.bytes_held > 0
    engine.abort(victim.request_id)
    assert engine.host.bytes_held == 0 and victim.request_id not in engine.kv.pool.tables
    engine.run_until_idle()
    engine.kv.pool.check()
    assert [engine.requests[i].finish_reason.value for i in ids].count("abort") == 1


def _batches(requests):
    """Requests grouped by the step they were first scheduled in, in order."""
    ordered = sorted(requests, key=lambda r: r.timeline.first_scheduled_s)
    return [list(g) for _, g in itertools.groupby(ordered, key=lambda r: r.timeline.first_scheduled_s)]


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_static_batching_admits_only_when_nothing_runs(tiny, checked_slots, batching):
    prompts = _prompts(seed=5)
    engine = Engine(tiny, EngineConfig(num_blocks=256, max_num_seqs=3, max_num_batched_tokens=256, batching=batching))
    lengths = [8, 2, 5, 3, 8, 1, 6, 4]  # outputs of different lengths, so continuous batching refills early
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    engine.run_until_idle()
    engine.kv.pool.check()
    requests = [engine.requests[i] for i in ids]
    for prompt, request, n in zip(prompts, requests, lengths):
        assert request.output_ids == _reference(tiny, prompt)[:n]
    batches = _batches(requests)
    disjoint = all(min(r.timeline.first_scheduled_s for r in later) > max(r.timeline.end_s for r in earlier)
                   for earlier, later in zip(batches, batches[1:]))
    if batching == "static":
        assert [len(b) for b in batches] == [3, 3, 2] and disjoint
    else:  # the same requests join as others leave
        assert not disjoint


def test_a_static_batch_fills_across_steps_when_its_prompts_exceed_the_budget(tiny):
    prompts = _prompts(seed=5)
    engine = Engine(tiny, EngineConfig(num_blocks=256, max_num_seqs=3, max_num_batched_tokens=16, batching="static"))
    requests = engine.generate(prompts, GREEDY)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, prompt)
    assert max(s.num_running for s in engine.step_log) == 3
    ends = sorted(r.timeline.end_s for r in requests)
    starts = sorted(r.timeline.first_scheduled_s for r in requests)
    assert starts[3] > ends[2]  # the second batch starts after the first one ended


def test_bad_preemption_or_batching_is_refused():
    with pytest.raises(KvbenchError, match="preemption must be one of recompute, swap"):
        EngineConfig(preemption="offload")
    with pytest.raises(KvbenchError, match="batching must be one of continuous, static"):
        EngineConfig(batching="padded")
    with pytest.raises(KvbenchError, match="swap_space must be a positive whole number"):
        EngineConfig(swap_space=-1)
