import pytest

from kvbench.bench.spec import from_dict, load_suite, suite_names
from kvbench.errors import KvbenchError
from kvbench.strategies import STRATEGIES

REFERENCE_SUITES = {"cache-vs-nocache", "prompt-sweep", "strategy-sweep", "decode-micro"}


def test_reference_suites_ship_and_load():
    assert REFERENCE_SUITES <= set(suite_names())
    for name in suite_names():
        spec = load_suite(name)
        assert spec.name == name
        assert spec.points()
        assert spec.resolved(quick=True).points()


def test_strategy_sweep_covers_every_registered_strategy():
    assert set(load_suite("strategy-sweep").strategies) == set(STRATEGIES.names())


def test_decode_micro_isolates_decode():
    spec = load_suite("decode-micro")
    assert spec.prompt_tokens == (512,) and spec.output_tokens == (64,)


def test_unknown_suite_lists_valid_names():
    with pytest.raises(KvbenchError, match="unknown suite 'nope'; valid: .*prompt-sweep"):
        load_suite("nope")


def test_unknown_key_is_rejected():
    with pytest.raises(KvbenchError, match="unknown suite key.*tirals"):
        from_dict({"name": "x", "tirals": 3})


def test_bad_values_are_rejected():
    with pytest.raises(KvbenchError, match="unknown strategy"):
        from_dict({"name": "x", "strategies": ["fast"]})
    with pytest.raises(KvbenchError, match="output_tokens must be positive"):
        from_dict({"name": "x", "output_tokens": [0]})
    with pytest.raises(KvbenchError, match="baseline"):
        from_dict({"name": "x", "strategies": ["dynamic"], "baseline": "no_cache"})


def test_override_order_yaml_then_quick_then_flags():
    spec = from_dict({"name": "x", "trials": 9, "quick": {"trials": 2, "warmup": 0}})
    assert spec.trials == 9
    quick = spec.resolved(quick=True)
    assert (quick.trials, quick.warmup) == (2, 0)
    assert quick.with_overrides(trials=5, warmup=None).trials == 5


def test_points_are_the_cross_product():
    spec = from_dict({"name": "x", "strategies": ["no_cache", "dynamic"], "prompt_tokens": [8, 16],
                      "output_tokens": [4], "batch_sizes": [1, 2]})
    keys = [p.key for p in spec.points()]
    assert len(keys) == len(set(keys)) == 8


def test_digest_ignores_trial_count_but_not_axes():
    a = from_dict({"name": "x", "prompt_tokens": [8]})
    assert a.digest() == a.with_overrides(trials=10).digest()
    assert a.digest() != a.with_overrides(prompt_tokens=[16]).digest()
