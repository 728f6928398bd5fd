"""Budgeted eviction (sink, h2o, snapkv) and KIVI-style quantization on tiny random models."""

import pytest
import torch

from kvbench.engine import GenerationConfig, generate
from kvbench.engine.model_runner import forward
from kvbench.errors import KvbenchError
from kvbench.strategies import build_strategy
from kvbench.strategies.budget import capacity
from kvbench.strategies.eviction import EVICT_SLACK, keep_top
from kvbench.strategies.quantized import QuantizedLayer, pack, quantize, unpack
from kvbench.strategies.scores import attention_modules
from kvbench.strategies.sink import SinkLayer

GREEDY = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
PROMPT = [list(range(20, 120))]


def _positions(n, batch=1, heads=2, dim=4):
    """Keys/values whose every entry is the token's position, so survivors can be read off."""
    x = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(batch, heads, n, dim).contiguous()
    return x, x.clone()


# --- budget ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, 0, -3, "half", True])
def test_bad_budgets_are_rejected(budget):
    with pytest.raises(KvbenchError, match="budget"):
        build_strategy("h2o", budget=budget)


def test_capacity_fraction_and_count():
    assert capacity(0.25, 100) == 25 and capacity(1.0, 77) == 77 and capacity(0.1, 5) == 1
    assert capacity(64, 1000) == 64


def test_window_must_fit_in_the_budget():
    with pytest.raises(KvbenchError, match="must be fewer than the budget"):
        build_strategy("h2o", budget=16, window=16)
    with pytest.raises(KvbenchError, match="must be fewer than the budget"):
        build_strategy("sink", budget=4, sink_tokens=4)


def test_budget_too_small_for_the_prompt(tiny):
    with pytest.raises(KvbenchError, match="keeps 10 of a 100-token prompt"):
        generate(tiny, build_strategy("snapkv", budget=0.1, window=32), PROMPT, GREEDY)


def test_eviction_strategies_refuse_batches(tiny):
    with pytest.raises(KvbenchError, match="does not support batches"):
        generate(tiny, build_strategy("h2o"), PROMPT * 2, GREEDY)


# --- which tokens survive -------------------------------------------------------------------------

def test_sink_keeps_sinks_and_recent_window():
    layer = SinkLayer(budget=24, sink_tokens=4)
    k, v = _positions(40)
    out_k, _ = layer.update(k, v)
    assert out_k.shape[2] == 40  # the prefill step itself attends over everything
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 2, 3] + list(range(20, 40))
    for pos in range(40, 40 + EVICT_SLACK):  # decode: no copy until the slack is used up
        layer.update(*(t + pos for t in _positions(1)))
    assert layer.size == 24 + EVICT_SLACK
    layer.update(*(t + 40 + EVICT_SLACK for t in _positions(1)))
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 2, 3] + list(range(37, 57))
    assert torch.equal(layer.values, layer.keys)


def test_keep_top_keeps_best_scores_and_the_tail_in_order():
    scores = torch.tensor([[[5.0, 0.1, 9.0, 0.2, 7.0, 0.0, 0.0]]])
    assert keep_top(scores, protected_tail=2, keep=4).tolist() == [[[2, 4, 5, 6]]]


def _cache_after_prefill(lm, strategy, prompt):
    cache = strategy.make_cache(lm, 1, len(prompt), 1)
    ids = torch.tensor([prompt])
    with torch.inference_mode(), strategy.attach(lm, cache):
        forward(lm.model, ids, cache=cache)
    return cache


def test_snapkv_keeps_a_subset_of_the_real_keys_and_the_window(tiny):
    prompt = PROMPT[0]
    full = _cache_after_prefill(tiny, build_strategy("dynamic"), prompt)
    snap = _cache_after_prefill(tiny, build_strategy("snapkv", budget=40, window=8), prompt)
    for full_layer, layer in zip(full.layers, snap.layers):
        assert layer.keys.shape[2] == 40
        assert torch.equal(layer.keys[:, :, -8:], full_layer.keys[:, :, -8:])
        for head in range(layer.keys.shape[1]):  # every kept key is the original, RoPE'd at its original position
            kept = layer.keys[0, head]
            matches = (kept[:, None, :] == full_layer.keys[0, head][None, :, :]).all(-1).nonzero()[:, 1]
            assert len(matches) == 40 and matches.tolist() == sorted(matches.tolist())


def test_h2o_holds_at_most_its_budget_after_prefill(tiny):
    cache = _cache_after_prefill(tiny, build_strategy("h2o", budget=30, window=8), PROMPT[0])
    assert all(layer.keys.shape[2] == 30 and layer.mass.shape[2] == 30 for layer in cache.layers)


# --- budget 1.0 is the full cache, smaller budgets free memory -------------------------------------

@pytest.mark.parametrize("name", ["sink", "h2o", "snapkv"])
def test_full_budget_equals_dynamic(tiny, name):
    reference = generate(tiny, build_strategy("dynamic"), PROMPT, GREEDY)
    result = generate(tiny, build_strategy(name, budget=1.0), PROMPT, GREEDY)
    assert result.tokens == reference.tokens
    assert result.kv_cache_bytes == reference.kv_cache_bytes


@pytest.mark.parametrize("name", ["sink", "h2o", "snapkv"])
def test_eviction_really_frees_kv_bytes(tiny, name):
    prompt = [list(range(20, 276))]
    reference = generate(tiny, build_strategy("dynamic"), prompt, GREEDY)
    result = generate(tiny, build_strategy(name, budget=0.25), prompt, GREEDY)
    assert result.kv_cache_bytes <= 0.3 * reference.kv_cache_bytes
    assert len(result.tokens[0]) == 12


def _unhooked(lm) -> bool:
    """No forward hook and no attention-path observer left on any attention layer."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and not hasattr(m, "_kvbench_attention_observer")
               for m in attention_modules(lm.model))


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_score_hooks_are_removed_after_generation(tiny, name):
    generate(tiny, build_strategy(name, budget=0.5), PROMPT, GREEDY)
    assert _unhooked(tiny)


@pytest.mark.parametrize("name, method", [("h2o", "accumulate"), ("snapkv", "observe")])
def test_hooks_are_removed_even_when_generation_fails(tiny, monkeypatch, name, method):
    strategy = build_strategy(name, budget=0.5)
    monkeypatch.setattr(type(strategy), method, lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        generate(tiny, strategy, PROMPT, GREEDY)
    assert _unhooked(tiny)


# --- quantization ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_within_half_a_step(bits):
    x = torch.randn(2, 3, 16, 64)
    codes, scale, zero = quantize(x, bits, dim=2)
    restored = codes.float() * scale.float() + zero.float()
    assert ((restored - x).abs() <= scale.float() / 2 + 1e-3).all()


def test_float16_float_part_bytes_are_exact():
    layer = QuantizedLayer(bits=8, group_size=16, residual=8, sink_tokens=4, float_dtype=torch.float16)
    b, h, d, n = 1, 2, 32, 4 + 16 * 3 + 10
    k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    out_k, _ = layer.update(k, v)
    assert torch.equal(out_k, k)  # prefill still attends in the model's precision
    fp = (4 + 10) * b * h * d * 2 * 2  # sinks + residual in float16
    codes = 48 * b * h * d * 2
    meta = ((48 // 16) * b * h * d + 48 * b * h * (d // 16)) * 2 * 2  # fp16 scale + zero, keys and values
    assert layer.nbytes() == fp + codes + meta
    new_k = torch.randn(b, h, 1, d)
    out_k, _ = layer.update(new_k, torch.randn(b, h, 1, d))
    assert out_k.dtype == torch.float32 and torch.allclose(out_k[:, :, -1:], new_k, atol=1e-2)


def test_quantized_layer_bytes_are_exact():
    layer = QuantizedLayer(bits=4, group_size=16, residual=8, sink_tokens=4)
    b, h, d, n = 1, 2, 32, 4 + 16 * 3 + 10
    k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    out_k, out_v = layer.update(k, v)
    assert torch.equal(out_k, k)  # prefill attends in full precision
    assert layer.body_tokens == 48 and layer.recent_k.shape[2] == 10 and layer.get_seq_length() == n
    fp = (4 + 10) * b * h * d * 4 * 2  # sinks + residual, keys and values, float32
    codes = 48 * b * h * d // 2 * 2  # 4-bit codes, keys and values
    key_meta = (48 // 16) * b * h * d * 2 * 2  # fp16 scale + zero per channel per 16-token group
    value_meta = 48 * b * h * (d // 16) * 2 * 2  # fp16 scale + zero per token per 16-channel group
    assert layer.nbytes() == fp + codes + key_meta + value_meta


def test_quantized_decode_returns_dequantized_history():
    layer = QuantizedLayer(bits=8, group_size=16, residual=4, sink_tokens=2)
    k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    layer.update(k, v)
    new_k, new_v = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    out_k, out_v = layer.update(new_k, new_v)
    assert out_k.shape[2] == 41
    assert torch.equal(out_k[:, :, :2], k[:, :, :2]) and torch.equal(out_k[:, :, -1:], new_k)
    assert (out_k[:, :, :40] - k).abs().max() < 0.05 and (out_v[:, :, :40] - v).abs().max() < 0.05


def test_quantized_with_everything_in_the_residual_equals_dynamic(tiny):
    reference = generate(tiny, build_strategy("dynamic"), PROMPT, GREEDY)
    result = generate(tiny, build_strategy("quantized", bits=4, residual=1000), PROMPT, GREEDY)
    assert result.tokens == reference.tokens


def test_int8_tracks_dynamic_and_shrinks_the_cache(tiny):
    prompt = [list(range(20, 276))]
    reference = generate(tiny, build_strategy("dynamic"), prompt, GREEDY)
    result = generate(tiny, build_strategy("quantized", bits=8), prompt, GREEDY)
    # tiny: head_dim 16 makes value scales weigh 1/4 byte per element, and the float32 sinks + residual
    # window are a third of a 267-token sequence; exact byte counts are tested on QuantizedLayer above
    assert result.kv_cache_bytes < 0.6 * reference.kv_cache_bytes
    assert sum(a == b for a, b in zip(result.tokens[0], reference.tokens[0])) >= 10


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 3}, "bits 3 not supported by quantized; valid: 8, 4, 2"),
    ({"group_size": 0}, "group_size must be > 0"),
    ({"float_dtype": "int8"}, "float_dtype 'int8' not supported; valid: model, float16, bfloat16"),
])
def test_bad_quantization_settings(kwargs, message):
    with pytest.raises(KvbenchError, match=message):
        build_strategy("quantized", **kwargs)


def test_group_size_must_fit_head_dim(tiny):
    with pytest.raises(KvbenchError, match="does not divide head_dim 16"):
        generate(tiny, build_strategy("quantized", group_size=12), PROMPT, GREEDY)


# --- speculative fetch ----------------------------------------------------------------------------

def test_speculative_fetch_with_full_budget_equals_dynamic(tiny):
    reference = generate(tiny, build_strategy("dynamic"), PROMPT, GREEDY)
    assert generate(tiny, build_strategy("speculative_fetch", budget=1.0), PROMPT, GREEDY).tokens == reference.tokens


def test_speculative_fetch_attends_over_the_fetched_tokens_only(tiny):
    from kvbench.strategies.speculative import SpeculativeLayer

    layer = SpeculativeLayer(budget=24, window=4, partial_channels=4, offload=torch.device("cpu"))
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    assert layer.update(k, v)[0].shape[2] == 40  # prefill: everything
    layer.query = torch.randn(1, 4, 1, 16)
    new_k, new_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    out_k, out_v = layer.update(new_k, new_v)
    assert out_k.shape[2] == 24
    assert layer.get_mask_sizes(1) == (24, 0)  # the next step's attention length, as the mask must see it
    assert layer.get_seq_length() == 41  # nothing is dropped: it all stays on the offload side
    assert torch.equal(out_k[:, :, -1:], new_k)  # the recent window comes along
    full = torch.cat([k, new_k], dim=2)
    for head in range(2):  # every fetched key is a stored key, in order
        rows = (out_k[0, head][:, None, :] == full[0, head][None, :, :]).all(-1).nonzero()[:, 1].tolist()
        assert len(rows) == 24 and rows == sorted(rows)


def test_speculative_fetch_generates_and_keeps_every_token(tiny):
    prompt = [list(range(20, 276))]
    reference = generate(tiny, build_strategy("dynamic"), prompt, GREEDY)
    result = generate(tiny, build_strategy("speculative_fetch", budget=0.25), prompt, GREEDY)
    assert len(result.tokens[0]) == 12
    assert result.kv_cache_bytes > reference.kv_cache_bytes  # full KV offloaded plus the partial keys
    assert all(not m._forward_pre_hooks for m in attention_modules(tiny.model))
    assert "functional check" in build_strategy("speculative_fetch").notes(torch.device("cpu"))[0]


# --- transformers' QuantizedCache as a peer -------------------------------------------------------

def test_hf_fp8_bytes_are_exact(tiny):
    result = generate(tiny, build_strategy("hf_quantized", backend="fp8"), PROMPT, GREEDY)
    cfg = tiny.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    tokens = 100 + 12 - 1
    # one byte per element, one float32 scale per tensor, keys and values, every layer
    expected = cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads * head_dim * tokens + 4)
    assert result.kv_cache_bytes == expected
    assert len(result.tokens[0]) == 12


def test_quanto_tensors_count_their_packed_storage():
    from optimum.quanto import MaxOptimizer, qint4, quantize_weight

    from kvbench.strategies.base import tensor_bytes

    x = torch.randn(1, 2, 64, 16)
    scale, shift = MaxOptimizer()(x, qint4, 0, 64)
    q = quantize_weight(x, qint4, 0, scale, shift, 64)
    groups = x.numel() // 64
    assert tensor_bytes(q) == x.numel() // 2 + 2 * groups * 4  # 4-bit codes + float32 scale and shift per group
    assert tensor_bytes((q, {"extra": q._scale}), None) == tensor_bytes(q) + groups * 4


def test_hf_quanto_int4_generates_and_shrinks_the_cache(tiny):
    prompt = [list(range(20, 276))]
    reference = generate(tiny, build_strategy("dynamic"), prompt, GREEDY)
    result = generate(tiny, build_strategy("hf_quantized", backend="quanto", bits=4, residual=32), prompt, GREEDY)
    assert len(result.tokens[0]) == 12
    assert result.kv_cache_bytes < 0.5 * reference.kv_cache_bytes


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "bnb"}, "unknown hf_quantized backend 'bnb'; valid: quanto, hqq, fp8"),
    ({"backend": "fp8", "bits": 8}, "fixed format; leave bits unset"),
    ({"backend": "quanto", "bits": 8}, "bits 8 not supported by backend quanto; valid: 2, 4"),
    ({"backend": "hqq", "residual": 0}, "must be > 0"),
])
def test_bad_hf_quantized_settings(kwargs, message):
    with pytest.raises(KvbenchError, match=message):
        build_strategy("hf_quantized", **kwargs)


def test_missing_backend_package_says_how_to_install(tiny, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    with pytest.raises(KvbenchError, match="needs the hqq package: pip install hqq"):
        generate(tiny, build_strategy("hf_quantized", backend="hqq"), PROMPT, GREEDY)


def test_hf_hqq_int8_keeps_greedy_output(tiny):
    prompt = [list(range(20, 276))]
    reference = generate(tiny, build_strategy("dynamic"), prompt, GREEDY)
    result = generate(tiny, build_strategy("hf_quantized", backend="hqq", bits=8, residual=32), prompt, GREEDY)
    assert result.tokens == reference.tokens
    assert result.kv_cache_bytes < 0.4 * reference.kv_cache_bytes
