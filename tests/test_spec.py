import pytest

from kvbench.bench.spec import load_spec, spec_from_dict, spec_names
from kvbench.errors import KvbenchError
from kvbench.strategies import STRATEGIES

REFERENCE_SUITES = {"cache-vs-nocache", "prompt-sweep", "strategy-sweep", "decode-micro"}


def test_reference_suites_ship_and_load():
    assert REFERENCE_SUITES <= set(spec_names())
    for name in spec_names():
        spec = load_spec(name)
        assert spec.name == name
        assert spec.points()
        assert spec.resolved(quick=True).points()


def test_strategy_sweep_covers_every_registered_strategy():
    assert {s.name for s in load_spec("strategy-sweep").strategies} == set(STRATEGIES.names())


def test_decode_micro_isolates_decode():
    spec = load_spec("decode-micro")
    assert spec.prompt_tokens == (512,) and spec.output_tokens == (64,)


def test_unknown_suite_lists_valid_names():
    with pytest.raises(KvbenchError, match="unknown spec 'nope'; valid: .*prompt-sweep"):
        load_spec("nope")


def test_unknown_key_is_rejected():
    with pytest.raises(KvbenchError, match="unknown suite key.*tirals"):
        spec_from_dict({"name": "x", "tirals": 3})


def test_bad_values_are_rejected():
    with pytest.raises(KvbenchError, match="unknown strategy"):
        spec_from_dict({"name": "x", "strategies": ["fast"]})
    with pytest.raises(KvbenchError, match="output_tokens must be positive"):
        spec_from_dict({"name": "x", "output_tokens": [0]})
    with pytest.raises(KvbenchError, match="baseline"):
        spec_from_dict({"name": "x", "strategies": ["dynamic"], "baseline": "no_cache"})


def test_override_order_yaml_then_quick_then_flags():
    spec = spec_from_dict({"name": "x", "trials": 9, "quick": {"trials": 2, "warmup": 0}})
    assert spec.trials == 9
    quick = spec.resolved(quick=True)
    assert (quick.trials, quick.warmup) == (2, 0)
    assert quick.resolved(trials=5, warmup=None).trials == 5


def test_points_are_the_cross_product():
    spec = spec_from_dict({"name": "x", "strategies": ["no_cache", "dynamic"], "prompt_tokens": [8, 16],
                      "output_tokens": [4], "batch_sizes": [1, 2]})
    keys = [p.key for p in spec.points()]
    assert len(keys) == len(set(keys)) == 8


def test_digest_ignores_trial_count_but_not_axes():
    a = spec_from_dict({"name": "x", "prompt_tokens": [8]})
    assert a.digest() == a.resolved(trials=10).digest()
    assert a.digest() != a.resolved(prompt_tokens=[16]).digest()


def test_digest_leaves_out_unset_fields_at_any_depth():
    """An optional field that a later kvbench adds (None by default) keeps earlier runs resumable."""
    from kvbench.bench.spec import _without_unset

    assert _without_unset({"a": 1, "b": None, "c": {"d": None, "e": [{"f": None, "g": 2}]}}) == \
        {"a": 1, "c": {"e": [{"g": 2}]}}
    spec = spec_from_dict({"kind": "serve", "name": "x", "engines": [{"max_num_seqs": 2}]})
    assert spec.workload.max_prompt_tokens is None
    assert spec.digest() != spec.resolved(workload={**spec.to_dict()["workload"], "max_prompt_tokens": 4096}).digest()


def test_strategy_entries_with_parameters():
    from kvbench.bench.suite import parse_strategy

    assert parse_strategy("h2o:budget=0.25:window=8").label == "h2o[budget=0.25,window=8]"
    assert parse_strategy({"name": "quantized", "bits": 4}).label == "quantized[bits=4]"
    with pytest.raises(KvbenchError, match="bits 3 not supported"):
        parse_strategy("quantized:bits=3")
    with pytest.raises(KvbenchError, match="write name:key=value"):
        parse_strategy("h2o:budget")


def test_budgets_sweep_only_strategies_that_have_one():
    spec = spec_from_dict({"name": "x", "strategies": ["dynamic", "h2o", {"name": "sink", "budget": 64}],
                      "budgets": [0.5, 0.25]})
    assert [v.label for v in spec.variants()] == [
        "dynamic", "h2o[budget=0.5]", "h2o[budget=0.25]", "sink[budget=64]"]


def test_a_budget_a_strategy_rejects_fails_before_running():
    with pytest.raises(KvbenchError, match="budget"):
        spec_from_dict({"name": "x", "strategies": ["h2o"], "budgets": [2.5]})


def test_model_axis_names_models_in_keys():
    spec = spec_from_dict({"name": "x", "models": ["synthetic:tiny", "synthetic:135m"], "prompt_tokens": [8]})
    assert [p.key for p in spec.points()] == ["synthetic:tiny/dynamic/p8/o32/b1", "synthetic:135m/dynamic/p8/o32/b1"]
    assert [p.key for p in spec_from_dict({"name": "x", "prompt_tokens": [8]}).points()] == ["dynamic/p8/o32/b1"]


def test_spec_round_trips_through_its_dict():
    for name in spec_names():
        spec = load_spec(name)
        assert spec_from_dict(spec.to_dict()) == spec
