"""Cross-request reuse: identities, re-rotation, assembly exactness, the tiered store, bad input."""

import multiprocessing
import random

import pytest
import torch

from kvbench.engine import GenerationConfig, generate
from kvbench.engine.model_runner import forward
from kvbench.reuse import ReusingEngine
from kvbench.errors import KvbenchError
from kvbench.reuse import ReuseCache, ReuseConfig
from kvbench.reuse.blocks import Namespace, chain_keys, content_key, fingerprint, window_fingerprints
from kvbench.reuse.rope import Rerotator
from kvbench.reuse.store import Block, DiskTier, RamTier
from kvbench.strategies import build_strategy

NS = Namespace("model-a", "float32", 4)
GREEDY = GenerationConfig(max_new_tokens=12, stop_at_eos=False)


def _tokens(n, seed, vocab=1000):
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _block(seed, position=0, shape=(2, 2, 2, 4, 8)):
    g = torch.Generator().manual_seed(seed)
    tokens = tuple(_tokens(shape[3], seed))
    return Block(torch.randn(shape, generator=g), position, tokens, content_key(tokens, NS))


# identities

def test_chain_keys_are_a_prefix_chain_and_namespaced():
    a, b = _tokens(8, 1), _tokens(8, 2)
    assert chain_keys(a + b, NS)[:2] == chain_keys(a, NS)
    assert chain_keys(b + a, NS)[2:] != chain_keys(a, NS)  # same tokens after another prefix: other keys
    assert chain_keys(a, NS) == chain_keys(list(a), Namespace("model-a", "float32", 4))  # stable, not hash()
    for other in (Namespace("model-b", "float32", 4), Namespace("model-a", "bfloat16", 4)):
        assert chain_keys(a, other) != chain_keys(a, NS)
    assert len(chain_keys(a[:7], NS)) == 1  # only full blocks


def test_content_key_ignores_position_and_window_fingerprints_match_blocks():
    tokens = _tokens(40, 3)
    fps = window_fingerprints(tokens, 4)
    assert len(fps) == 37
    assert all(int(fps[i]) == fingerprint(tokens[i:i + 4]) for i in range(37))
    assert content_key(tokens[5:9], NS) == content_key(list(tokens[5:9]), NS)


def test_bad_block_size_is_refused():
    with pytest.raises(KvbenchError, match="block_size"):
        Namespace("m", "float32", 0)
    with pytest.raises(KvbenchError, match="block_size"):
        ReuseConfig(block_size=-1)


# re-rotation

def _layer0_keys(lm, ids, offset):
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    positions = torch.arange(offset, offset + len(ids))[None]
    forward(lm.model, torch.tensor([ids]), cache=cache, positions=positions)
    return cache.layers[0].keys  # layer 0's keys depend only on the token and its position


@pytest.mark.parametrize("delta", [37, -11])
def test_rerotation_equals_a_fresh_forward_at_the_new_position(tiny, delta):
    ids = _tokens(8, 4, tiny.config.vocab_size)
    at_p, at_q = _layer0_keys(tiny, ids, 20), _layer0_keys(tiny, ids, 20 + delta)
    moved = Rerotator(tiny.model).shift(at_p, delta)
    assert not torch.allclose(at_p, at_q, atol=1e-3)
    torch.testing.assert_close(moved, at_q, atol=1e-5, rtol=1e-5)


def test_a_rotation_that_does_not_match_the_model_is_refused(tiny):
    from kvbench.reuse.rope import check_rerotation

    rerotator = Rerotator(tiny.model)
    check_rerotation(tiny.model, rerotator)  # the model's own frequencies pass
    rerotator.inv_freq = rerotator.inv_freq * 2  # what an interleaved or per-layer RoPE would look like
    with pytest.raises(KvbenchError, match="use reuse mode 'prefix'"):
        check_rerotation(tiny.model, rerotator)


def test_sliding_window_models_and_mask_blind_attention_are_refused():
    from types import SimpleNamespace

    from transformers import LlamaConfig, MistralConfig

    from kvbench.reuse.cache import _check_model

    mistral = MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=64, sliding_window=16)
    with pytest.raises(KvbenchError, match="sliding-window or hybrid"):
        _check_model(SimpleNamespace(name="m", config=mistral), ReuseConfig())
    llama = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    llama._attn_implementation = "flash_attention_2"
    _check_model(SimpleNamespace(name="m", config=llama), ReuseConfig(mode="prefix"))
    with pytest.raises(KvbenchError, match="sdpa or eager"):
        _check_model(SimpleNamespace(name="m", config=llama), ReuseConfig(mode="chunk"))


def test_models_without_rope_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(KvbenchError, match="no rotary position embedding"):
        Rerotator(gpt2)


# assembly: exact where it claims to be

def test_exact_prefix_reuse_is_token_identical(tiny):
    dynamic, vocab = build_strategy("dynamic"), tiny.config.vocab_size
    document = _tokens(100, 5, vocab)
    cache = ReuseCache(tiny, ReuseConfig(block_size=16))
    first = generate(tiny, dynamic, [document + _tokens(5, 6, vocab)], GREEDY, reuse=cache)
    assert first.reuse.cached_tokens == 0
    prompt = document + _tokens(9, 7, vocab)
    result = generate(tiny, dynamic, [prompt], GREEDY, reuse=cache)
    assert result.reuse.cached_tokens == result.reuse.exact_tokens == 96
    assert result.reuse.computed_tokens == len(prompt) - 96
    assert result.tokens == generate(tiny, dynamic, [prompt], GREEDY).tokens


def test_a_fully_cached_prompt_still_computes_its_last_token(tiny):
    engine = ReusingEngine(tiny, ReuseConfig(block_size=16))
    prompt = _tokens(64, 8, tiny.config.vocab_size)
    engine.warm(prompt)
    check = engine.verify_correctness(prompt, max_new_tokens=12)
    assert check.identical and check.reuse.cached_tokens == 63 and check.reuse.computed_tokens == 1


def test_interleaved_cached_and_computed_tokens_are_exact(tiny):
    """A block missing from the middle of a cached prompt: chunk mode finds the later blocks by
    content at their own positions, and the one forward with a 4D mask computes the gap in
    between; the K/V are then all exact, so the output must equal no reuse."""
    dynamic, vocab = build_strategy("dynamic"), tiny.config.vocab_size
    prompt = _tokens(80, 9, vocab) + _tokens(6, 10, vocab)
    cache = ReuseCache(tiny, ReuseConfig(block_size=16, mode="chunk", recompute="none"))
    generate(tiny, dynamic, [prompt], GREEDY, reuse=cache)
    gap = chain_keys(prompt, cache.ns)[1]
    del cache.store.ram.entries[gap], cache.store.ram.uses[gap]
    result = generate(tiny, dynamic, [prompt], GREEDY, reuse=cache)
    assert result.reuse.exact_tokens == 16 and result.reuse.cached_tokens == 64
    assert result.tokens == generate(tiny, dynamic, [prompt], GREEDY).tokens


@pytest.mark.parametrize("recompute,params", [("selective", {"selective_tokens": 500}), ("cacheblend", {"blend_fraction": 1.0})])
def test_recomputing_every_stitched_token_gives_the_reference(tiny, recompute, params):
    dynamic, vocab = build_strategy("dynamic"), tiny.config.vocab_size
    document = _tokens(96, 11, vocab)
    cache = ReuseCache(tiny, ReuseConfig(block_size=16, mode="chunk", recompute=recompute, **params))
    generate(tiny, dynamic, [_tokens(7, 12, vocab) + document], GREEDY, reuse=cache)
    prompt = _tokens(21, 13, vocab) + document + _tokens(5, 14, vocab)
    result = generate(tiny, dynamic, [prompt], GREEDY, reuse=cache)
    assert result.reuse.recomputed_tokens >= 80 and result.reuse.exact_tokens == 0
    assert result.tokens == generate(tiny, dynamic, [prompt], GREEDY).tokens


def test_chunk_reuse_finds_a_document_after_another_preamble(tiny):
    dynamic, vocab = build_strategy("dynamic"), tiny.config.vocab_size
    document = _tokens(96, 15, vocab)
    cache = ReuseCache(tiny, ReuseConfig(block_size=16, mode="chunk", recompute="selective", selective_tokens=4))
    generate(tiny, dynamic, [_tokens(7, 16, vocab) + document], GREEDY, reuse=cache)
    result = generate(tiny, dynamic, [_tokens(30, 17, vocab) + document + [1, 2]], GREEDY, reuse=cache)
    # the cold prompt's blocks wholly inside the document start at its token 9 (16 - 7): 5 of them;
    # the first 4 tokens of the run are recomputed
    assert result.reuse.cached_tokens == 5 * 16 - 4 and result.reuse.recomputed_tokens == 4
    assert result.reuse.exact_until == 30 + 9  # nothing from the first approximate token on is stored


def test_reuse_refuses_batches_and_other_strategies(tiny):
    cache = ReuseCache(tiny, ReuseConfig(block_size=16))
    with pytest.raises(KvbenchError, match="one prompt at a time"):
        generate(tiny, build_strategy("dynamic"), [[1, 2], [3, 4]], GREEDY, reuse=cache)
    with pytest.raises(KvbenchError, match="dynamic"):
        generate(tiny, build_strategy("static"), [[1, 2]], GREEDY, reuse=cache)


def test_bad_reuse_configs_are_refused(tiny):
    with pytest.raises(KvbenchError, match="valid: prefix, chunk"):
        ReuseConfig(mode="radix")
    with pytest.raises(KvbenchError, match="valid: none, selective, cacheblend"):
        ReuseConfig(recompute="all")
    with pytest.raises(KvbenchError, match="too small for one block"):
        ReuseCache(tiny, ReuseConfig(ram_bytes=100))
    with pytest.raises(KvbenchError, match="probe_layer"):
        ReuseCache(tiny, ReuseConfig(mode="chunk", recompute="cacheblend", probe_layer=0))
    with pytest.raises(KvbenchError, match="disk tier's budget .* too small for one block"):
        ReuseCache(tiny, ReuseConfig(disk_dir="/tmp", disk_bytes=100))


# the store

def test_ram_lru_evicts_least_recent_and_lfu_least_used():
    size = _block(0).nbytes
    lru = RamTier(3 * size, "lru")
    for i in range(3):
        lru.put(f"k{i}", _block(i))
    lru.get("k0")
    lru.put("k3", _block(3))
    assert lru.keys() == ["k2", "k0", "k3"] and lru.stats.evictions == 1
    lfu = RamTier(3 * size, "lfu")
    for i in range(3):
        lfu.put(f"k{i}", _block(i))
    lfu.get("k0"), lfu.get("k0"), lfu.get("k2")
    lfu.put("k3", _block(3))
    assert sorted(lfu.keys()) == ["k0", "k2", "k3"]
    assert lfu.stats.bytes == 3 * size


def test_int8_ram_tier_stores_fewer_bytes_close_to_the_original():
    block = _block(1)
    tier = RamTier(1 << 20, int8=True)
    tier.put("k", block)
    assert tier.stats.bytes < block.nbytes / 2
    got = tier.get("k").kv
    assert got.dtype == block.kv.dtype
    assert (got - block.kv).abs().max() <= (block.kv.amax(-1) - block.kv.amin(-1)).max() / 255


def test_disk_tier_roundtrip_restart_and_bytes(tmp_path):
    disk = DiskTier(tmp_path, NS)
    blocks = {f"k{i}": _block(i, position=4 * i) for i in range(3)}
    for key, block in blocks.items():
        disk.put(key, block)
    restarted = DiskTier(tmp_path, NS)
    assert sorted(restarted.keys()) == sorted(blocks)
    assert restarted.stats.bytes == sum(p.stat().st_size for p in restarted.dir.glob("*.kvb"))
    for key, block in blocks.items():
        got = restarted.get(key)
        assert torch.equal(got.kv, block.kv) and got.position == block.position and got.tokens == block.tokens
    assert DiskTier(tmp_path, Namespace("model-b", "float32", 4)).keys() == []  # other namespace


@pytest.mark.parametrize("damage", ["payload", "header", "truncate", "garbage", "misnamed"])
def test_a_corrupt_disk_entry_is_a_logged_miss_and_removed(tmp_path, caplog, damage):
    disk = DiskTier(tmp_path, NS)
    disk.put("k", _block(1, position=8))
    disk.put("other", _block(2))
    path = disk.dir / "k.kvb"
    data = bytearray(path.read_bytes())
    if damage == "payload":
        data[-40] ^= 0xFF
    elif damage == "header":  # a digit of the position: still valid JSON, caught by the checksum
        at = data.index(b'"position": 8')
        data[at + len('"position": ')] = ord("9")
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"nonsense")
    else:  # another key's file under this key's name
        data = bytearray((disk.dir / "other.kvb").read_bytes())
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="kvbench.reuse"):
        assert disk.get("k") is None
    assert not path.exists() and disk.stats.corrupt == 1 and "k" not in disk
    assert "corrupt" in caplog.text


def test_a_block_another_process_evicted_is_a_plain_miss(tmp_path):
    disk = DiskTier(tmp_path, NS)
    disk.put("k", _block(1))
    (disk.dir / "k.kvb").unlink()  # what a sharing process's eviction does
    assert disk.get("k") is None and disk.stats.corrupt == 0 and "k" not in disk


def test_unwritable_disk_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KvbenchError, match="cannot use .* as the disk tier"):
        DiskTier(blocker / "sub", NS)


def test_a_disk_tier_deleted_while_running_costs_a_logged_store_not_the_request(tiny, tmp_path, caplog):
    """A user clearing the cache with rm -rf while a process runs: the request that ran keeps its answer."""
    import shutil

    engine = ReusingEngine(tiny, ReuseConfig(block_size=16, disk_dir=str(tmp_path / "kv")))
    shutil.rmtree(tmp_path / "kv")
    prompt = _tokens(40, 23, tiny.config.vocab_size)
    with caplog.at_level("WARNING", logger="kvbench.reuse"):
        result = engine.generate(prompt, GREEDY)
    assert result.tokens == generate(tiny, build_strategy("dynamic"), [prompt], GREEDY).tokens
    assert "could not store a block: cannot write to the disk tier" in caplog.text


@pytest.mark.parametrize("intruder", ["directory", "symlink loop", "dangling symlink"])
def test_entries_named_like_blocks_that_are_not_files_are_ignored_at_rebuild(tmp_path, caplog, intruder):
    disk = DiskTier(tmp_path, NS)
    disk.put("k", _block(1))
    odd = disk.dir / "odd.kvb"
    if intruder == "directory":
        odd.mkdir()
    elif intruder == "symlink loop":
        odd.symlink_to(odd)
    else:
        odd.symlink_to(disk.dir / "missing.kvb")
    with caplog.at_level("WARNING", logger="kvbench.reuse"):
        restarted = DiskTier(tmp_path, NS)
    assert restarted.keys() == ["k"] and torch.equal(restarted.get("k").kv, _block(1).kv)
    assert odd.is_symlink() or odd.is_dir()  # not ours: left where it is
    assert "not a regular file" in caplog.text


def _write_blocks(root, seeds):
    disk = DiskTier(root, NS)
    for s in seeds:
        disk.put(f"k{s}", _block(s))


def test_two_processes_sharing_a_disk_tier_never_corrupt_it(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_blocks, args=(tmp_path, range(i, i + 30))) for i in (0, 10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    disk = DiskTier(tmp_path, NS)
    assert len(disk.keys()) == 40
    assert all(torch.equal(disk.get(f"k{s}").kv, _block(s).kv) for s in range(40))
    assert disk.stats.corrupt == 0 and not list(disk.dir.glob(".tmp-*"))


def test_disk_hits_survive_a_restart_of_the_engine(tiny, tmp_path):
    config = ReuseConfig(block_size=16, disk_dir=str(tmp_path))
    prompt = _tokens(70, 18, tiny.config.vocab_size)
    ReusingEngine(tiny, config).warm(prompt)
    fresh = ReusingEngine(tiny, config)  # a new process would rebuild the same index from the files
    result = fresh.generate(prompt, GREEDY)
    assert result.reuse.tier_tokens == {"disk": 64}
    assert fresh.cache_stats()["tiers"]["disk"]["hits"] == 4
    assert result.tokens == generate(tiny, build_strategy("dynamic"), [prompt], GREEDY).tokens


def test_a_full_ram_tier_keeps_the_start_of_a_chain_usable(tiny):
    cache = ReuseCache(tiny, ReuseConfig(block_size=16))
    cache.store.ram = RamTier(3 * cache.block_bytes, "lru")  # room for 3 of the prompt's 6 blocks
    prompt = _tokens(100, 19, tiny.config.vocab_size)
    dynamic = build_strategy("dynamic")
    generate(tiny, dynamic, [prompt], GREEDY, reuse=cache)
    result = generate(tiny, dynamic, [prompt], GREEDY, reuse=cache)
    assert result.reuse.exact_tokens == 48  # blocks 0-2 survived; evicting them first would leave nothing usable


def test_a_content_hit_whose_block_holds_other_tokens_is_not_used(tiny):
    """What a key collision would look like: the stored block's tokens differ from the prompt's."""
    dynamic, vocab = build_strategy("dynamic"), tiny.config.vocab_size
    document = _tokens(96, 20, vocab)
    prompt = _tokens(30, 22, vocab) + document + [1, 2]
    counts = []
    for tamper in (False, True):
        cache = ReuseCache(tiny, ReuseConfig(block_size=16, mode="chunk", recompute="none"))
        generate(tiny, dynamic, [_tokens(7, 21, vocab) + document], GREEDY, reuse=cache)
        if tamper:
            block = next(b for b, _ in cache.store.ram.entries.values() if b.position == 32)
            block.tokens = tuple(t + 1 for t in block.tokens)
        counts.append(generate(tiny, dynamic, [prompt], GREEDY, reuse=cache).reuse.cached_tokens)
    assert counts == [80, 64]
