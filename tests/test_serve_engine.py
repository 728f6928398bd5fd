"""The serving engine on the tiny model: per request, the tokens of `kvbench.engine.generate()` at batch 1,
whatever the batching, chunking, block size, prefix caching, backend or preemption."""

import random

import pytest

from kvbench.engine import GenerationConfig, generate
from kvbench.engine.sampling import SamplingConfig
from kvbench.errors import KvbenchError
from kvbench.serve import Engine, EngineConfig, FinishReason, SamplingParams
from kvbench.serve import runner
from kvbench.strategies import build_strategy

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
_references: dict = {}


def _prompts(seed=0, lengths=(3, 17, 40, 1, 33, 64, 16, 9)):
    rng = random.Random(seed)
    shared = [rng.randrange(512) for _ in range(32)]  # half the prompts share a 32-token prefix
    return [(shared if i % 2 else [])[:n] + [rng.randrange(512) for _ in range(max(1, n - 32 * (i % 2)))]
            for i, n in enumerate(lengths)]


def _reference(lm, prompt, sampling=SamplingConfig()):
    key = (tuple(prompt), sampling)
    if key not in _references:
        config = GenerationConfig(max_new_tokens=MAX_TOKENS, sampling=sampling, stop_at_eos=False)
        _references[key] = generate(lm, build_strategy("dynamic"), [prompt], config).tokens[0]
    return _references[key]


@pytest.fixture
def checked_slots(monkeypatch):
    """Fail a step that writes a slot twice or writes into a block another request shares."""
    prepare = runner.prepare

    def checking(rows, pool, store, device):
        inputs = prepare(rows, pool, store, device)
        slots = inputs.ctx.slot_mapping.tolist()
        assert len(set(slots)) == len(slots), "a slot written twice in one step"
        assert all(pool.refs[s // pool.block_size] == 1 for s in slots), "a write into a shared block"
        return inputs

    monkeypatch.setattr(runner, "prepare", checking)


def _serve(lm, config, prompts, seed=0, sampling=GREEDY):
    """Add the prompts in a random order, some while others already run; returns requests in prompt order."""
    engine = Engine(lm, config)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    ids = {}
    for i in order:
        ids[i] = engine.add_request(prompts[i], sampling)
        if i % 3 == 0:
            engine.step()
            engine.kv.pool.check()
    while engine.has_work():
        engine.step()
        engine.kv.pool.check()
    assert engine.kv.pool.usage().used == 0
    return engine, [engine.requests[ids[i]] for i in range(len(prompts))]


@pytest.mark.parametrize("budget", [1, 7, 64])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("caching", [True, False])
def test_engine_tokens_equal_generate(tiny, checked_slots, budget, block_size, caching):
    prompts = _prompts()
    config = EngineConfig(block_size=block_size, num_blocks=4096 // block_size, max_num_batched_tokens=budget,
                          enable_prefix_caching=caching, max_num_seqs=6)
    engine, requests = _serve(tiny, config, prompts, seed=budget)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, prompt)
        assert request.finish_reason is FinishReason.LENGTH
    if budget > 1:  # (a budget of one token runs one request at a time, FCFS)
        assert max(s.num_running for s in engine.step_log) > 1  # requests really ran together
    if caching and budget == 64:
        assert sum(r.num_cached for r in requests) > 0  # the shared prefix was hit


@pytest.mark.parametrize("admission,preemption", [("optimistic", "recompute"), ("optimistic", "swap"),
                                                  ("reserve", "recompute")])
@pytest.mark.parametrize("chunked", [True, False])
def test_a_small_pool_preempts_or_reserves_and_tokens_still_equal(tiny, checked_slots, admission, preemption,
                                                                   chunked):
    prompts = _prompts(seed=1)
    config = EngineConfig(block_size=4, num_blocks=30, max_num_batched_tokens=64, admission=admission,
                          chunked_prefill=chunked, watermark=0.0, preemption=preemption)
    engine, requests = _serve(tiny, config, prompts, seed=1)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, prompt)
    preemptions = sum(r.preemptions for r in requests)
    assert preemptions > 0 if admission == "optimistic" else preemptions == 0
    swaps, recomputed = sum(r.swaps for r in requests), sum(r.preempted_tokens for r in requests)
    assert (swaps, recomputed > 0) == ((preemptions, False) if preemption == "swap" else (0, preemptions > 0))
    assert max(s.blocks_used + s.blocks_promised for s in engine.step_log) <= 30


def test_contiguous_backend_equals_generate_and_reserves_whole_slabs(tiny, checked_slots):
    prompts = _prompts(seed=2)
    config = EngineConfig(kv_backend="contiguous", max_model_len=128, num_blocks=4, max_num_batched_tokens=32)
    engine, requests = _serve(tiny, config, prompts, seed=2)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, prompt)
    busiest = max(engine.step_log, key=lambda s: s.blocks_used)
    assert busiest.blocks_used == 4  # at most four requests at once, one slab each
    assert busiest.kv_bytes_reserved == 4 * 128 * engine.kv.pool.token_bytes


def test_seeded_sampling_draws_what_generate_draws(tiny):
    prompts = _prompts(seed=3)[:4]
    sampling = SamplingConfig(temperature=0.8, top_k=50, seed=7)
    _, requests = _serve(tiny, EngineConfig(num_blocks=256), prompts, sampling=SamplingParams(
        max_tokens=MAX_TOKENS, sampling=sampling, ignore_eos=True))
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _reference(tiny, prompt, sampling)


def test_a_shared_prefix_is_held_once(tiny):
    rng = random.Random(4)
    prefix = [rng.randrange(512) for _ in range(64)]  # four blocks of 16
    prompts = [prefix + [rng.randrange(512) for _ in range(5)] for _ in range(4)]
    engine = Engine(tiny, EngineConfig(num_blocks=64))
    first = engine.add_request(prompts[0], GREEDY)
    engine.step()  # the first request's prefill computes (and keys) the prefix blocks
    others = [engine.add_request(p, GREEDY) for p in prompts[1:]]
    engine.step()
    pool = engine.kv.pool
    assert [engine.requests[i].num_cached for i in others] == [64, 64, 64]
    assert [pool.refs[b] for b in pool.tables[first][:4]] == [4, 4, 4, 4]
    assert pool.usage().used == 4 + 4  # the prefix once, plus each request's own tail block
    pool.check()
    engine.run_until_idle()
    for prompt, i in zip(prompts, [first] + others):
        assert engine.requests[i].output_ids == _reference(tiny, prompt)


def test_stop_abort_timeline_and_stats(tiny):
    prompt = _prompts()[2]
    eos = _reference(tiny, prompt)[2]
    tiny.model.generation_config.eos_token_id, saved = eos, tiny.model.generation_config.eos_token_id
    try:
        engine = Engine(tiny, EngineConfig(num_blocks=64, max_num_batched_tokens=64))
        stopped = engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS))
        aborted = engine.add_request(prompt, GREEDY)
        engine.step()  # all of the first prompt, 24 tokens of the second
        engine.abort(aborted)
        assert aborted not in engine.kv.pool.tables
        engine.run_until_idle()
    finally:
        tiny.model.generation_config.eos_token_id = saved
    stopped, aborted = engine.requests[stopped], engine.requests[aborted]
    assert stopped.output_ids == _reference(tiny, prompt)[:3] and stopped.finish_reason is FinishReason.STOP
    assert aborted.finish_reason is FinishReason.ABORT and aborted.output_ids == []
    t = stopped.timeline
    assert t.arrival_s <= t.first_scheduled_s <= t.first_token_s == t.token_s[0] <= t.token_s[-1] == t.end_s
    assert engine.kv.pool.usage().used == 0
    assert sum(s.decode_tokens for s in engine.step_log) == 2
    assert sum(s.prefill_tokens for s in engine.step_log) == len(prompt) + 24  # the aborted one's first chunk
    assert tiny.config._attn_implementation == "sdpa"


def test_first_scheduled_is_the_start_of_the_step_that_first_ran_it(tiny):
    engine = Engine(tiny, EngineConfig(num_blocks=64))
    request = engine.requests[engine.add_request(_prompts()[0], GREEDY)]
    engine.step()  # the whole 3-token prompt and the first token
    (step,) = engine.step_log
    sampled = step.t_s - step.update_ms / 1e3
    assert request.timeline.first_token_s == pytest.approx(sampled, abs=1e-9)
    assert request.timeline.first_scheduled_s == pytest.approx(step.t_s - step.step_ms / 1e3, abs=1e-9)
    assert request.timeline.first_scheduled_s < sampled - (step.forward_ms + step.sample_ms) / 1e3 + 1e-9


def test_forget_drops_finished_requests_and_ids_are_never_reused(tiny):
    engine = Engine(tiny, EngineConfig(num_blocks=64), step_log_limit=2)
    first, running = engine.add_request(_prompts()[0], GREEDY), engine.add_request(_prompts()[1], GREEDY)
    with pytest.raises(KvbenchError, match="has not finished; abort it") as error:
        engine.forget(running)
    assert "\n" not in str(error.value)
    engine.run_until_idle()
    engine.forget(first)
    engine.forget(running)
    assert not engine.requests and not engine._samplers
    again = engine.add_request(_prompts()[0], GREEDY)
    assert again not in (first, running)
    engine.run_until_idle()
    assert engine.requests[again].output_ids == _reference(tiny, _prompts()[0])
    assert len(engine.step_log) == 2 and [s.step for s in engine.step_log] == [engine.num_steps - 2, engine.num_steps - 1]
    with pytest.raises(KvbenchError, match=f"no request {first}"):
        engine.abort(first)


def test_requests_that_can_never_run_are_refused(tiny):
    engine = Engine(tiny, EngineConfig(block_size=16, num_blocks=4))
    with pytest.raises(KvbenchError, match="needs 5 KV blocks but the pool has 4") as error:
        engine.add_request(list(range(60)), SamplingParams(max_tokens=8))
    assert "\n" not in str(error.value)
    with pytest.raises(KvbenchError, match="max_model_len"):
        Engine(tiny, EngineConfig(max_model_len=32, num_blocks=64)).add_request(list(range(30)), GREEDY)
    with pytest.raises(KvbenchError, match="admission must be one of"):
        EngineConfig(admission="eager")


def test_requests_join_at_their_arrival_time(tiny):
    engine = Engine(tiny, EngineConfig(num_blocks=64))
    now = engine.now()
    early = engine.add_request(_prompts()[0], GREEDY, arrival_s=now)
    late = engine.add_request(_prompts()[1], GREEDY, arrival_s=now + 0.05)
    engine.step()
    assert engine.requests[early].num_computed > 0 and engine.requests[late].timeline.first_scheduled_s is None
    engine.run_until_idle()
    late = engine.requests[late]
    assert late.timeline.first_scheduled_s >= late.timeline.arrival_s == now + 0.05
    assert late.output_ids == _reference(tiny, _prompts()[1])


def test_a_prompt_filling_the_pool_runs_alone_despite_the_watermark(tiny):
    engine = Engine(tiny, EngineConfig(block_size=4, num_blocks=20, watermark=0.5))
    (request,) = engine.generate([_prompts()[2]], GREEDY)  # 40 + 8 tokens: 12 of 20 blocks, over the watermark
    assert request.output_ids == _reference(tiny, _prompts()[2])
