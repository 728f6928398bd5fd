"""Quantized KV blocks on the paged pool (`kvbench.serve.quant_blocks`, policy `quantized`) on the tiny model
(head_dim 16, 2 layers, 2 KV heads): bytes counted exactly, the per_seq strategy's tokens reproduced, the
gathered K/V the per_seq strategy's dequantized K/V, more requests at once under a cap, errors in one line."""

import random

import pytest
import torch

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.serve import Engine, EngineConfig, SamplingParams
from kvbench.serve.quant_blocks import QuantizedBlockPool, QuantizedKVStore, StoreShape
from kvbench.strategies.quantized import QuantizedLayer

BS = 16
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x float32
# One quantized block over both layers, by hand: K and V codes (16 tokens x 2 heads x 16 channels at `bits`),
# key scale + zero per head and channel, value scale + zero per token and head (one group of 16 channels), fp16.
QUANTIZED_BYTES = {8: 2 * (2 * 16 * 2 * 16 + 2 * 2 * (2 * 16) + 2 * 2 * (16 * 2)),
                   4: 2 * (2 * 16 * 2 * 8 + 2 * 2 * (2 * 16) + 2 * 2 * (16 * 2))}


def _strategy(bits=8, residual=8):
    return f"quantized:bits={bits}:group_size={BS}:residual={residual}:sink_tokens={BS}"


def _config(strategy=None, **fields):
    fields = {"num_blocks": 256, "block_size": BS, "max_num_batched_tokens": 64, "max_num_seqs": 4, **fields}
    return EngineConfig(strategy=strategy, **fields)


def _prompts(seed=0, lengths=(70, 130, 96, 81)):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


def _serve(lm, config, prompts, max_tokens=40, on_step=None):
    engine = Engine(lm, config)
    ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts]
    while engine.has_work():
        engine.step()
        engine.kv.pool.check()
        if on_step:
            on_step(engine)
    assert engine.kv.pool.usage().used == 0 and getattr(engine.kv.pool.usage(), "quantized", 0) == 0
    return engine, [engine.requests[i] for i in ids]


@pytest.mark.parametrize("bits", [8, 4])
def test_bytes_held_are_the_float_slots_and_the_quantized_blocks_referenced(tiny, bits):
    store_bytes = []

    def check(engine):
        pool, store, usage = engine.kv.pool, engine.kv.store, engine.kv.pool.usage()
        arena = [store.key_codes, store.value_codes, store.key_scale, store.key_zero, store.value_scale,
                 store.value_zero]
        store_bytes.append(sum(t[0][0].numel() * t[0].element_size() for t in arena) * len(store.k))
        expected, quantized = 0, 0
        for request in engine.scheduler.running:
            table = pool.tables[request.request_id]
            entries = request.num_entries
            for i, block in enumerate(table):
                if block >= pool.num_blocks:
                    quantized += 1
                    expected += QUANTIZED_BYTES[bits]
                else:
                    expected += min(BS, max(0, entries - i * BS)) * TOKEN_BYTES
            state = request.policy_state
            if state is not None and state.decoding:  # exactly the blocks out of the sinks and the window
                due = engine.kv.policy.due(request)
                assert [i for i, b in enumerate(table) if b >= pool.num_blocks] == list(due)
        assert usage.quantized == quantized and usage.bytes_used == expected
        assert usage.bytes_reserved == usage.used * BS * TOKEN_BYTES + quantized * QUANTIZED_BYTES[bits]

    engine, requests = _serve(tiny, _config(_strategy(bits)), _prompts(), on_step=check)
    assert set(store_bytes) == {QUANTIZED_BYTES[bits]}  # the hand count is the arena's shapes
    assert max(s.kv_bytes_used for s in engine.step_log) > 0
    assert engine.kv.pool.num_quantized == 256 * BS * TOKEN_BYTES // QUANTIZED_BYTES[bits]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_tokens_equal_the_per_seq_strategy(tiny, bits):
    """Sinks of one whole block and group = block: both backends quantize the same tokens with the same
    scales at the same step (a block leaves the window when the token that pushes it out is written), and
    dequantize with the same arithmetic, so the greedy tokens are equal."""
    strategy, prompts = _strategy(bits), _prompts()
    engine, paged = _serve(tiny, _config(strategy), prompts)
    _, per_seq = _serve(tiny, EngineConfig(kv_backend="per_seq", strategy=strategy, max_num_seqs=4), prompts)
    assert [r.output_ids for r in paged] == [r.output_ids for r in per_seq]
    _, plain = _serve(tiny, _config(), prompts)
    if bits == 2:  # the mechanism changes the output where it is coarse enough to
        assert [r.output_ids for r in paged] != [r.output_ids for r in plain]


def test_gather_returns_float_slots_and_the_per_seq_dequantization_of_quantized_ones():
    torch.manual_seed(0)
    layers, blocks, heads, d, bits = 2, 6, 2, 16, 4
    shape = StoreShape(layers, blocks, BS, heads, d, torch.float32, torch.device("cpu"))
    store = QuantizedKVStore(shape, bits, num_quantized=4)
    written = [(torch.randn(blocks * BS, heads, d), torch.randn(blocks * BS, heads, d)) for _ in range(layers)]
    for layer, (k, v) in enumerate(written):
        store.write(layer, torch.arange(blocks * BS), k, v)
    store.quantize([1, 4], into=[2, 0])  # float blocks 1 and 4 into arena blocks 2 and 0
    float_slots = blocks * BS
    index = torch.stack([torch.arange(0, 32), torch.cat([torch.arange(float_slots + 2 * BS, float_slots + 3 * BS),
                                                         torch.arange(float_slots, float_slots + BS)])])
    for layer, (k, v) in enumerate(written):
        keys, values = store.gather(layer, index)
        assert keys.shape == (2, 32, heads, d)
        assert torch.equal(keys[0], k[:32]) and torch.equal(values[0], v[:32])
        reference = QuantizedLayer(bits, BS, residual=0, sink_tokens=0)
        src = torch.cat([k[BS:2 * BS], k[4 * BS:5 * BS]]).transpose(0, 1)[None]  # [1, h, 32, d]: blocks 1 then 4
        vsrc = torch.cat([v[BS:2 * BS], v[4 * BS:5 * BS]]).transpose(0, 1)[None]
        reference.update(src, vsrc)
        ref_k, ref_v = reference._dequantized_body()
        assert torch.equal(keys[1], ref_k[0].transpose(0, 1)) and torch.equal(values[1], ref_v[0].transpose(0, 1))
        assert not torch.equal(keys[1], src[0].transpose(0, 1))  # dequantized, not the float K
        shuffled = torch.randperm(32)  # slots that are not whole blocks in order: scales read per token
        keys, values = store.gather(layer, index[1][shuffled])
        assert torch.equal(keys, ref_k[0].transpose(0, 1)[shuffled])
        assert torch.equal(values, ref_v[0].transpose(0, 1)[shuffled])


def test_int4_runs_more_requests_at_once_under_a_cap(tiny):
    prompts = _prompts(seed=1, lengths=(64,) * 24)
    peaks = {}
    for name, strategy in (("float", None), ("int8", _strategy(8)), ("int4", _strategy(4))):
        config = _config(strategy, num_blocks=40, max_num_seqs=24, enable_prefix_caching=False)
        engine, requests = _serve(tiny, config, prompts, max_tokens=48,
                                  on_step=lambda e: _within(e.kv.pool, 40 * BS * TOKEN_BYTES))
        assert all(len(r.output_ids) == 48 for r in requests)
        peaks[name] = max(s.num_running for s in engine.step_log)
    assert peaks["float"] < peaks["int8"] <= peaks["int4"], peaks


def _within(pool, budget):
    pool.check()  # ids neither lost nor doubled, bytes held within the budget
    assert pool.usage().bytes_reserved <= budget


def test_an_unquantized_block_fails_the_step(tiny, monkeypatch):
    monkeypatch.setattr(QuantizedBlockPool, "quantize", lambda self, *a: 0)
    engine = Engine(tiny, _config(_strategy()))
    engine.add_request(list(range(100)), SamplingParams(max_tokens=4))
    with pytest.raises(NotEngaged, match="holds 0 written quantized blocks where 4 must be quantized"):
        while engine.has_work():
            engine.step()


@pytest.mark.parametrize("fields, message", [
    ({"strategy": "quantized:group_size=64", "block_size": 16}, "group_size 64 must equal block_size 16; set "
                                                                 "block_size to 64"),
    ({"strategy": "quantized:bits=3:group_size=16"}, "bits 3 not supported by quantized; valid: 8, 4, 2"),
    ({"strategy": "quantized:group_size=16:float_dtype=float16"}, "float_dtype 'float16'"),
    ({"strategy": "quantized:group_size=16", "preemption": "swap"}, "use preemption recompute with quantized"),
])
def test_bad_quantized_configs_fail_in_one_line(fields, message):
    with pytest.raises(KvbenchError, match=message) as error:
        EngineConfig(**{"block_size": BS, **fields})
    assert "\n" not in str(error.value)


def test_a_block_size_that_splits_head_dim_unevenly_is_refused(tiny):
    with pytest.raises(KvbenchError, match="does not divide head_dim 16"):
        Engine(tiny, EngineConfig(strategy="quantized:group_size=12", block_size=12, num_blocks=64))
