"""Every strategy with a mechanism proves it ran (evicted, quantized, fetched, offloaded), and a mechanism that
did not engage fails the generation instead of yielding a record that looks valid.

These are the checks `make test-compat` runs on the lowest and highest supported transformers: a rename in
transformers' attention interface once turned h2o, snapkv and speculative_fetch into `dynamic` silently.
"""

from contextlib import nullcontext

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from kvbench.cli import main
from kvbench.engine import GenerationConfig, attention, generate
from kvbench.engine.teacher import teacher_forced_logprobs
from kvbench.errors import NotEngaged
from kvbench.strategies import build_strategy, eviction
from kvbench.strategies.eviction import EvictingLayer
from kvbench.strategies.offloaded import HostOffloadedLayer
from kvbench.strategies.quantized import QuantizedLayer

PROMPT_TOKENS, NEW_TOKENS = 256, 8
EVICTION = ["sink", "h2o", "snapkv"]
SCORED = ["h2o", "snapkv", "speculative_fetch"]


def _silence_scores(monkeypatch):
    """Scores never reach the strategies: no hooks (snapkv, speculative_fetch), no attention-path observer (h2o)."""
    monkeypatch.setattr(eviction, "attention_hooks", lambda *args, **kwargs: nullcontext())
    monkeypatch.setattr(attention, "observing", lambda *args, **kwargs: nullcontext())


def _prompt(lm, n=PROMPT_TOKENS, seed=0):
    return torch.randint(10, lm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(lm, strategy, prompt):
    """Generate greedily and return (result, the cache the strategy made)."""
    made = []
    make = strategy.make_cache

    def capture(*args):
        made.append(make(*args))
        return made[-1]

    strategy.make_cache = capture
    result = generate(lm, strategy, [prompt], GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False))
    return result, made[0]


def _check_mechanisms(lm):
    prompt = _prompt(lm)
    dynamic, _ = _run(lm, build_strategy("dynamic"), prompt)
    for name in EVICTION:
        result, cache = _run(lm, build_strategy(name, budget=0.25), prompt)
        assert result.kv_cache_bytes <= 0.3 * dynamic.kv_cache_bytes, name
        if name != "sink":  # sink needs no scores
            assert all(layer.observations >= NEW_TOKENS for layer in cache.layers), name  # one per forward
    result, cache = _run(lm, build_strategy("speculative_fetch", budget=0.25), prompt)
    for layer in cache.layers:
        assert layer.partial_steps == NEW_TOKENS - 1  # every decode step fetched a subset
        assert layer.fetched_tokens < 0.3 * layer.held_tokens
    result, cache = _run(lm, build_strategy("quantized", bits=4), prompt)
    assert result.kv_cache_bytes < 0.5 * dynamic.kv_cache_bytes  # codes, not floats (tiny heads: scales cost more)
    for layer in cache.layers:
        assert layer.key_codes.dtype == torch.uint8 and layer.body_tokens == layer.expected_body_tokens() > 0
    _, cache = _run(lm, build_strategy("offloaded"), prompt)
    assert all(layer.keys.device.type == "cpu" and layer.round_trips == NEW_TOKENS for layer in cache.layers)


def test_every_mechanism_engages_on_the_tiny_model(tiny):
    _check_mechanisms(tiny)


@pytest.mark.slow
def test_every_mechanism_engages_on_the_embedded_model(embedded):
    _check_mechanisms(embedded)


@pytest.mark.parametrize("name", SCORED)
def test_scoring_hooks_that_never_fire_fail_the_generation(tiny, monkeypatch, name):
    _silence_scores(monkeypatch)
    with pytest.raises(NotEngaged, match="hooks"):
        _run(tiny, build_strategy(name, budget=0.25), _prompt(tiny))


@pytest.mark.parametrize("name", ["sink", "h2o"])
def test_eviction_that_never_drops_fails_the_generation(tiny, monkeypatch, name):
    monkeypatch.setattr(EvictingLayer, "over_budget", lambda self, step_len: 0)
    with pytest.raises(NotEngaged, match="did not evict"):
        _run(tiny, build_strategy(name, budget=0.25), _prompt(tiny))


def test_quantization_that_never_flushes_fails_the_generation(tiny, monkeypatch):
    monkeypatch.setattr(QuantizedLayer, "_flush", lambda self: None)
    with pytest.raises(NotEngaged, match="quantized tokens"):
        _run(tiny, build_strategy("quantized"), _prompt(tiny))


def test_offloading_that_never_moves_the_kv_fails_the_generation(tiny, monkeypatch):
    monkeypatch.setattr(HostOffloadedLayer, "update", DynamicLayer.update)
    with pytest.raises(NotEngaged, match="never moved"):
        _run(tiny, build_strategy("offloaded"), _prompt(tiny))


def test_teacher_forcing_checks_engagement_too(tiny, monkeypatch):
    _silence_scores(monkeypatch)
    with pytest.raises(NotEngaged):
        teacher_forced_logprobs(tiny, build_strategy("h2o", budget=0.25), _prompt(tiny), [11, 12, 13])


def test_a_point_whose_strategy_did_not_engage_fails_the_run(tmp_path, monkeypatch, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nmodel: synthetic:tiny\ndevice: cpu\nworkload: {kind: synthetic}\n"
        "strategies: [dynamic, {name: h2o, budget: 0.25}]\nbaseline: dynamic\n"
        "prompt_tokens: [256]\noutput_tokens: [4]\ntrials: 1\nwarmup: 0\n"
    )
    _silence_scores(monkeypatch)
    assert main(["run", str(suite), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "h2o's attention-score hooks never fired" in err[0]
    records = tmp_path / "out" / "results.jsonl"
    assert not records.exists() or "h2o" not in records.read_text()
