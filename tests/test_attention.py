"""kvbench's attention path against the reference attention, and h2o's scores taken from it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function

from kvbench.engine import GenerationConfig, attention, generate
from kvbench.engine.model_runner import forward
from kvbench.errors import KvbenchError
from kvbench.strategies import build_strategy
from kvbench.strategies.h2o import H2O
from kvbench.strategies.scores import attention_hooks, attention_mass


def reference(query, key, value, scaling):
    """Dense float64 attention of `query` as the last q positions of `key` (GQA by repeating KV heads)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    scores = query.double() @ key.transpose(-1, -2) * scaling
    allowed = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ value).float()


SHAPES = [  # batch, heads, kv_heads, q, p, head_dim
    (1, 4, 2, 7, 30, 16),  # GQA
    (2, 6, 6, 5, 11, 8),  # no GQA, batch 2
    (1, 9, 3, 50, 300, 64),  # the embedded model's heads
    (1, 4, 1, 40, 3, 16),  # q > p, multi-query
    (1, 4, 2, 2, 1, 32),  # smallest tail
    (1, 8, 2, 1, 25, 16),  # one query (decode)
    (1, 4, 2, 12, 0, 16),  # no cache
]


@pytest.mark.parametrize("batch, heads, kv_heads, q_len, cached, dim", SHAPES)
def test_the_path_equals_the_reference_attention(batch, heads, kv_heads, q_len, cached, dim):
    gen = torch.Generator().manual_seed(q_len * 1000 + cached)
    query = torch.randn(batch, heads, q_len, dim, generator=gen)
    key = torch.randn(batch, kv_heads, cached + q_len, dim, generator=gen)
    value = torch.randn(batch, kv_heads, cached + q_len, dim, generator=gen)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    before = attention.PathCounts.tail
    output, _ = attention.attention(module, query, key, value, None, scaling=dim ** -0.5)
    expected = reference(query, key, value, dim ** -0.5).transpose(1, 2)
    assert output.shape == expected.shape
    assert (output - expected).abs().max() < 1e-5
    assert attention.PathCounts.tail - before == (1 if 1 < q_len < cached + q_len else 0)


@pytest.mark.parametrize("batch, heads, kv_heads, q_len, cached, dim", [s for s in SHAPES if 1 < s[3] and s[4]])
def test_the_masked_tail_for_other_devices_equals_the_reference(batch, heads, kv_heads, q_len, cached, dim):
    gen = torch.Generator().manual_seed(q_len)
    query = torch.randn(batch, heads, q_len, dim, generator=gen)
    key, value = (torch.randn(batch, kv_heads, cached + q_len, dim, generator=gen) for _ in range(2))
    output = attention.masked_tail_attention(query, key, value, dim ** -0.5)
    assert (output - reference(query, key, value, dim ** -0.5)).abs().max() < 1e-5


def _mask(**kwargs):
    base = dict(batch_size=1, q_length=4, kv_length=10, q_offset=6, mask_function=causal_mask_function,
                device="cpu", dtype=torch.float32)
    return attention.tail_mask(**{**base, **kwargs})


def test_the_mask_is_skipped_only_for_an_unpadded_causal_tail():
    assert _mask() is None
    assert _mask(q_length=1, kv_length=7) is None
    padded = torch.ones(1, 10, dtype=torch.bool)
    padded[0, 0] = False
    assert _mask(attention_mask=padded).shape == (1, 1, 4, 10)
    assert _mask(attention_mask=torch.ones(1, 10, dtype=torch.bool)) is None
    # keys beyond the tokens written (a static cache's free slots) are masked, never taken as a tail
    static = _mask(kv_length=16)
    assert static.shape == (1, 1, 4, 16) and not static[0, 0, :, 10:].any()
    assert _mask(allow_is_causal_skip=False) is not None
    assert _mask(local_size=3) is not None


def _logits(lm, prompt, cached, on=True, mask=None):
    cache = DynamicCache(config=lm.config)
    forward(lm.model, prompt[:, :cached], cache=cache)
    if not on:
        lm.config._attn_implementation = "eager"
    try:
        return forward(lm.model, prompt[:, cached:], cache=cache, logits_to_keep=0,
                       positions=torch.arange(cached, prompt.shape[1])[None], attention_mask=mask)
    finally:
        lm.config._attn_implementation = "sdpa"


@torch.inference_mode()
@pytest.mark.parametrize("cached, new", [(40, 9), (5, 30), (60, 1)])
def test_the_model_runs_the_path_and_matches_the_reference(tiny, cached, new):
    prompt = torch.randint(16, tiny.config.vocab_size, (1, cached + new), generator=torch.Generator().manual_seed(0))
    before = attention.PathCounts.tail
    logits = _logits(tiny, prompt, cached)
    layers = tiny.config.num_hidden_layers
    assert attention.PathCounts.tail - before == (layers if new > 1 else 0)
    assert tiny.config._attn_implementation == "sdpa"  # the switch is scoped to the call
    expected = _logits(tiny, prompt, cached, on=False)
    assert (logits - expected).abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@torch.inference_mode()
def test_an_interleaved_layout_keeps_its_mask(tiny):
    """A 4D mask (chunk reuse puts computed tokens among cached ones) runs sdpa with that mask."""
    prompt = torch.randint(16, tiny.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    allowed = torch.ones(5, 20, dtype=torch.bool).tril(15)
    allowed[:, 3] = False  # a hole no causal tail has
    mask = torch.zeros(1, 1, 5, 20).masked_fill(~allowed, torch.finfo(torch.float32).min)
    before = attention.PathCounts.tail
    logits = _logits(tiny, prompt, 15, mask=mask)
    assert attention.PathCounts.tail == before
    assert (logits - _logits(tiny, prompt, 15, on=False, mask=mask)).abs().max() < 1e-4


def test_a_forward_on_which_the_path_never_ran_fails(tiny, monkeypatch):
    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.NAME, sdpa_attention_forward)
    with pytest.raises(KvbenchError, match="never called kvbench's attention path"):
        forward(tiny.model, torch.tensor([[20, 21, 22]]))
    assert tiny.config._attn_implementation == "sdpa"


@dataclass
class HookH2O(H2O):
    """h2o as it scored before the path: queries recomputed in a forward hook on each attention layer."""

    @contextmanager
    def attach(self, lm, cache):
        def observe(module, hidden, rope):
            layer = cache.layers[module.layer_idx]
            layer.observations += 1
            self.accumulate(layer, attention_mass(module, hidden, rope, layer.keys), hidden.shape[1])

        with attention_hooks(lm.model, observe):
            yield


@pytest.mark.parametrize("budget", [1.0, 0.5, 24])
def test_h2o_scores_from_the_path_equal_the_hook_scores(tiny, monkeypatch, budget):
    caches = {}

    def keep(strategy):
        make = strategy.make_cache

        def made(*args):
            caches[type(strategy)] = make(*args)
            return caches[type(strategy)]
        monkeypatch.setattr(strategy, "make_cache", made)
        return strategy

    prompt = torch.randint(16, tiny.config.vocab_size, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    config = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    path = generate(tiny, keep(build_strategy("h2o", budget=budget, window=8)), [prompt], config)
    hooks = generate(tiny, keep(HookH2O(budget=budget, window=8)), [prompt], config)
    assert path.tokens == hooks.tokens
    for ours, theirs in zip(caches[H2O].layers, caches[HookH2O].layers):
        assert ours.size == theirs.size
        assert torch.allclose(ours.mass, theirs.mass, atol=1e-5)
        assert torch.equal(ours.keys, theirs.keys)


def test_h2o_refuses_a_model_the_path_does_not_serve(tiny, monkeypatch):
    monkeypatch.setattr(tiny.config, "_attn_implementation", "eager")
    with pytest.raises(KvbenchError, match="attn_implementation='sdpa'"):
        generate(tiny, build_strategy("h2o", window=2), [list(range(20, 40))], GenerationConfig(max_new_tokens=2))
