"""Spill (`kvbench.serve.spill`): prefix blocks the pool evicts go to the reuse store's RAM / disk tiers and
come back for a later prompt, counted in its cached tokens by tier, with the tokens of a run without spill."""

import dataclasses
import random

import pytest
import torch

from kvbench.errors import KvbenchError
from kvbench.reuse.blocks import chain_keys
from kvbench.serve import Engine, EngineConfig
from kvbench.serve.metrics import ServerMetrics
from kvbench.serve.spill import PoolSpill
from test_serve_engine import GREEDY, _reference, _serve, checked_slots  # noqa: F401 (a fixture)
from test_serve_engine import _prompts as engine_prompts
from test_serve_swap import _block_bytes

BS = 4
SMALL_POOL = dict(block_size=BS, num_blocks=16, max_num_batched_tokens=64)  # one 48-token request at a time
MiB = 2**20


def _prompts(seed=0):
    """A 30-token prompt (7 full blocks before its last token) and two 40-token ones that evict its blocks."""
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in (30, 40, 40)]


def _evict(engine, prompts):
    """Run the first prompt, then the others one at a time: their blocks evict all of its from the pool."""
    first = engine.generate(prompts[:1], GREEDY)[0]
    for prompt in prompts[1:]:
        engine.generate([prompt], GREEDY)
        engine.kv.pool.check()
    assert engine.kv.pool.match_prefix(prompts[0]) == []
    return first


def _evicted_then_again(engine, prompts):
    first = _evict(engine, prompts)
    again = engine.generate(prompts[:1], GREEDY)[0]
    engine.kv.pool.check()
    return first, again


@pytest.mark.parametrize("admission", ["optimistic", "reserve"])
def test_evicted_prefix_loads_back_from_ram_with_the_same_tokens(tiny, admission):
    prompts = _prompts()
    plain = Engine(tiny, EngineConfig(**SMALL_POOL, admission=admission))
    _, recomputed = _evicted_then_again(plain, prompts)
    assert recomputed.num_cached == 0 and recomputed.num_cached_by_tier == {}

    engine = Engine(tiny, EngineConfig(**SMALL_POOL, admission=admission, kv_spill_ram=MiB))
    first, again = _evicted_then_again(engine, prompts)
    assert again.num_cached == 28 and again.num_cached_by_tier == {"ram": 28}  # every full block before the last token
    assert again.output_ids == first.output_ids == recomputed.output_ids == _reference(tiny, prompts[0])
    assert engine.spill.stats()["tokens_loaded"] == {"ram": 28}
    third = engine.generate(prompts[:1], GREEDY)[0]  # loaded blocks are keyed like computed ones: a pool hit now
    assert third.num_cached_by_tier == {"pool": 28} and third.output_ids == first.output_ids


def test_an_offloaded_pool_spills_and_loads_back_without_counting_the_spill_as_moved(tiny):
    """offloaded keeps prefix caching (its pool is plain KV in a host tier): spill reads the host tensors
    themselves, so the bytes the tier counts are still exactly the requests' reads."""
    prompts = _prompts(2)
    engine = Engine(tiny, EngineConfig(**SMALL_POOL, strategy="offloaded", kv_spill_ram=MiB))
    first = _evict(engine, prompts)
    again = engine.generate(prompts[:1], GREEDY)[0]
    assert engine.spill.blocks_spilled >= 7 and again.num_cached_by_tier == {"ram": 28}
    assert again.output_ids == first.output_ids == _reference(tiny, prompts[0])
    assert engine.kv.store.bytes_moved == sum(r.bytes_moved or 0 for r in engine.requests.values())


def test_a_fresh_engine_loads_the_prefix_from_the_disk_tier(tiny, tmp_path):
    prompts = _prompts(1)
    config = EngineConfig(**SMALL_POOL, kv_spill_ram=MiB, kv_spill_dir=str(tmp_path))
    first, _ = _evicted_then_again(Engine(tiny, config), prompts)
    fresh = Engine(tiny, config)  # an empty pool and RAM tier over the same directory
    again = fresh.generate(prompts[:1], GREEDY)[0]
    assert again.num_cached == 28 and again.num_cached_by_tier == {"disk": 28}
    assert again.output_ids == first.output_ids == _reference(tiny, prompts[0])
    assert fresh.spill.tiers.disk.stats.hits == 7 and fresh.spill.tiers.ram.stats.blocks == 7  # promoted to RAM
    metrics = ServerMetrics("m")
    metrics.on_finished(again)
    assert 'tier="disk"} 28.0' in metrics.render().decode()


def test_a_prefix_partly_in_the_pool_continues_in_the_store(tiny):
    prompts = _prompts(2)
    engine = Engine(tiny, EngineConfig(**SMALL_POOL, kv_spill_ram=MiB))
    engine.generate(prompts[:1], GREEDY)
    engine.generate(prompts[1:2], GREEDY)  # evicts the prompt's tail blocks first (released tail first), not all
    held = len(engine.kv.pool.match_prefix(prompts[0]))
    assert 0 < held < 7
    again = engine.generate(prompts[:1], GREEDY)[0]
    assert again.num_cached_by_tier == {"pool": held * BS, "ram": (7 - held) * BS}
    assert again.output_ids == _reference(tiny, prompts[0])


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_loaded_blocks_are_plain_keyed_blocks_under_preemption(tiny, checked_slots, preemption):
    prompts = engine_prompts(seed=1)
    config = EngineConfig(block_size=BS, num_blocks=30, max_num_batched_tokens=64, watermark=0.0,
                          preemption=preemption, kv_spill_ram=MiB)
    engine, requests = _serve(tiny, config, prompts + prompts, seed=1)  # each prompt twice, in a shuffled order
    for prompt, request in zip(prompts + prompts, requests):
        assert request.output_ids == _reference(tiny, prompt)
        assert request.num_cached == sum(request.num_cached_by_tier.values())
    assert sum(r.preemptions for r in requests) > 0 and engine.spill.stats()["tokens_loaded"]["ram"] > 0


@pytest.fixture
def evictions(monkeypatch):
    """What the pool hands the spill: (key, the pool block's K/V of every layer, [layers, 2, bs, kvh, d])."""
    seen, spill = [], PoolSpill.spill

    def spy(self, block, key, parent, tokens, position):
        seen.append((key, torch.stack([torch.stack((k[block], v[block])) for k, v in zip(self.store.k, self.store.v)])))
        spill(self, block, key, parent, tokens, position)

    monkeypatch.setattr(PoolSpill, "spill", spy)
    return seen


@pytest.mark.parametrize("ram_blocks", [None, 5])
def test_the_store_holds_exactly_the_spilled_blocks(tiny, tmp_path, evictions, ram_blocks):
    block_bytes = _block_bytes(tiny, BS)
    ram = MiB if ram_blocks is None else ram_blocks * block_bytes
    engine = Engine(tiny, EngineConfig(**SMALL_POOL, kv_spill_ram=ram, kv_spill_dir=str(tmp_path)))
    _evicted_then_again(engine, _prompts(3))
    spill = engine.spill
    spilled = dict(evictions)  # a key evicted twice (loaded back, evicted again) is spilled once
    assert len(spilled) == spill.blocks_spilled > 7 and spill.stats()["bytes_spilled"] == len(spilled) * block_bytes
    disk, ram_tier = spill.tiers.disk, spill.tiers.ram
    assert set(disk.keys()) == set(spilled)  # written through: the disk holds every spilled block
    assert disk.stats.bytes == sum(p.stat().st_size for p in disk.dir.glob("*.kvb"))
    held = len(spilled) if ram_blocks is None else ram_blocks
    assert ram_tier.stats.blocks == len(ram_tier.keys()) == held and ram_tier.stats.bytes == held * block_bytes
    for key, kv in spilled.items():  # the pool's K/V at eviction, bit for bit, in the Block layout
        assert torch.equal(disk.get(key).kv, kv.transpose(2, 3))
        if key in ram_tier:
            assert torch.equal(ram_tier.get(key).kv, kv.transpose(2, 3))


def test_a_corrupt_disk_entry_is_a_miss_and_the_rest_is_computed(tiny, tmp_path):
    prompts = _prompts(4)
    config = EngineConfig(**SMALL_POOL, kv_spill_ram=MiB, kv_spill_dir=str(tmp_path))
    _evicted_then_again(Engine(tiny, config), prompts)
    fresh = Engine(tiny, config)
    keys = chain_keys(prompts[0][:29], fresh.kv.pool.namespace)
    path = fresh.spill.tiers.disk._path(keys[2])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the third block's K/V
    path.write_bytes(bytes(data))
    again = fresh.generate(prompts[:1], GREEDY)[0]
    assert again.num_cached_by_tier == {"disk": 8}  # the two blocks before it; from it on, computed
    assert again.output_ids == _reference(tiny, prompts[0])
    assert fresh.spill.tiers.disk.stats.corrupt == 1 and not path.exists()


@pytest.mark.parametrize("forged", ["parent", "tokens", "position"])
def test_a_stored_block_of_another_prefix_is_never_loaded(tiny, forged):
    prompts = _prompts(5)
    engine = Engine(tiny, EngineConfig(**SMALL_POOL, kv_spill_ram=MiB))
    _evict(engine, prompts)
    ram, key = engine.spill.tiers.ram, chain_keys(prompts[0][:29], engine.kv.pool.namespace)[1]
    block, packed = ram.entries[key]  # the second block, as if another prefix's K/V had been stored under its key
    changed = {"parent": dict(parent="0" * 32), "tokens": dict(tokens=(1,) * BS), "position": dict(position=0)}
    ram.entries[key] = (dataclasses.replace(block, **changed[forged]), packed)
    assert len(engine.spill.find(prompts[0], 0)) == 7  # found by key alone; refused when read
    again = engine.generate(prompts[:1], GREEDY)[0]
    assert again.num_cached_by_tier == {"ram": BS} and again.output_ids == _reference(tiny, prompts[0])


@pytest.mark.parametrize("fields, message", [
    (dict(kv_spill_dir="/tmp/x"), "kv_spill_dir needs kv_spill_ram"),
    (dict(kv_spill_ram=0), "kv_spill_ram must be a positive whole number"),
    (dict(kv_spill_ram=MiB, kv_spill_dir=""), "kv_spill_dir must be a directory path"),
    (dict(kv_spill_ram=MiB, kv_backend="contiguous"), "the contiguous backend has none"),
    (dict(kv_spill_ram=MiB, kv_backend="per_seq"), "the per_seq backend has none"),
    (dict(kv_spill_ram=MiB, enable_prefix_caching=False), "enable_prefix_caching is off"),
    (dict(kv_spill_ram=MiB, strategy="h2o:budget=0.5"), "turns prefix caching off"),
    (dict(kv_spill_ram=MiB, strategy="quantized:bits=8:group_size=16"), "turns prefix caching off"),
    (dict(kv_spill_ram=MiB, strategy="speculative_fetch:budget=0.5"), "turns prefix caching off"),
])
def test_config_errors(fields, message):
    with pytest.raises(KvbenchError, match=message):
        EngineConfig(**fields)


def test_engine_errors_and_flags(tiny, tmp_path):
    with pytest.raises(KvbenchError, match="holds no block of 4 tokens"):
        Engine(tiny, EngineConfig(**SMALL_POOL, kv_spill_ram=100))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KvbenchError, match="cannot use .* as the disk tier"):
        Engine(tiny, EngineConfig(**SMALL_POOL, kv_spill_ram=MiB, kv_spill_dir=str(blocker)))
    from kvbench.bench.serve_spec import parse_engine
    from kvbench.cli import build_parser
    from kvbench.serve.launch import engine_config

    given = build_parser().parse_args(["serve", "--kv-spill-ram", "1GiB", "--kv-spill-dir", str(tmp_path)])
    assert engine_config(given) == EngineConfig(kv_spill_ram=2**30, kv_spill_dir=str(tmp_path))
    assert parse_engine({"kv_spill_ram": "64MiB"}).config.kv_spill_ram == 64 * MiB
