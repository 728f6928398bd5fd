import pytest

from kvbench.engine import GenerationConfig, generate
from kvbench.errors import KvbenchError
from kvbench.registry import Registry
from kvbench.strategies import STRATEGIES, build_strategy


def test_builtin_strategies_registered():
    assert {"no_cache", "dynamic", "static", "offloaded"} <= set(STRATEGIES.names())


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(KvbenchError, match=r"unknown strategy 'dynamc'; valid: .*dynamic.*no_cache"):
        build_strategy("dynamc")


def test_unknown_parameter_is_rejected():
    with pytest.raises(KvbenchError, match="unknown strategy .dynamic. parameter"):
        build_strategy("dynamic", budget=0.5)


def test_registry_rejects_duplicates():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)


def _kv_bytes_expected(lm, batch, tokens):
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * batch * lm.dtype.itemsize


@pytest.mark.parametrize("name", ["dynamic", "offloaded"])
def test_growing_cache_bytes_are_exact(tiny, name):
    prompts = [[5] * 10, [7] * 6]
    result = generate(tiny, build_strategy(name), prompts, GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    # the last sampled token is never fed back, so the cache holds prompt + new - 1 positions (padded to the longest)
    assert result.kv_cache_bytes == _kv_bytes_expected(tiny, batch=2, tokens=10 + 5 - 1)


def test_static_cache_bytes_are_preallocated(tiny):
    result = generate(tiny, build_strategy("static"), [[5] * 10], GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    assert result.kv_cache_bytes == _kv_bytes_expected(tiny, batch=1, tokens=10 + 5)


def test_no_cache_holds_nothing(tiny):
    result = generate(tiny, build_strategy("no_cache"), [[5] * 10], GenerationConfig(max_new_tokens=3))
    assert result.kv_cache_bytes == 0


def test_lossless_strategies_agree_on_greedy_tokens(tiny):
    lossless = [n for n in STRATEGIES.names() if STRATEGIES.get(n).capabilities.lossless]
    assert {"no_cache", "dynamic", "static", "offloaded"} <= set(lossless)
    assert "quantized" not in lossless and "h2o" not in lossless
    prompts = [list(range(20, 50)), list(range(100, 112))]
    config = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    outputs = {name: generate(tiny, build_strategy(name), prompts, config).tokens for name in lossless}
    reference = outputs["dynamic"]
    assert all(len(row) == 12 for row in reference)
    for name, tokens in outputs.items():
        assert tokens == reference, name


def test_offloaded_says_it_is_a_functional_check_on_cpu(tiny):
    notes = build_strategy("offloaded").notes(tiny.device)
    assert notes and "functional check" in notes[0]
