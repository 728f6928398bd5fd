import math

import numpy as np
import pytest

from kvbench.bench.metrics import request_timing, speedup, summarize, throughput


def test_request_timing_from_hand_made_steps():
    t = request_timing([0.100, 0.120, 0.150, 0.160], batch_size=2)
    assert t.ttft_ms == pytest.approx(100)
    assert t.itl_ms == pytest.approx([20, 30, 10])
    assert t.decode_ms == pytest.approx(60)
    assert t.e2e_ms == pytest.approx(160)
    assert t.tpot_ms == pytest.approx(20)  # (160 - 100) / (4 - 1)
    assert t.decode_tokens_per_s == pytest.approx(2 * 3 / 0.060)


def test_single_token_has_no_tpot():
    t = request_timing([0.05])
    assert t.itl_ms == [] and t.tpot_ms is None and t.decode_tokens_per_s is None


def test_empty_request_is_an_error():
    with pytest.raises(ValueError):
        request_timing([])


def test_summary_percentiles_come_from_raw_samples():
    samples = list(range(1, 101))
    s = summarize(samples)
    assert s.n == 100 and s.mean == pytest.approx(50.5)
    assert s.p50 == pytest.approx(np.percentile(samples, 50))
    assert s.p99 == pytest.approx(99.01)
    assert s.std == pytest.approx(np.std(samples, ddof=1))
    assert (s.min, s.max) == (1, 100)


def test_summary_of_nothing_is_nan_not_a_crash():
    s = summarize([])
    assert s.n == 0 and math.isnan(s.mean) and math.isnan(s.p99)


def test_summary_ignores_missing_values():
    s = summarize([None, 2.0, float("nan"), 4.0])
    assert s.n == 2 and s.mean == 3.0


def test_single_sample_has_zero_spread():
    assert summarize([7.0]).std == 0.0


def test_throughput_and_speedup():
    tp = throughput([500, 500], [1, 1], [10, 30])
    assert tp["requests_per_s"] == pytest.approx(2.0)
    assert tp["tokens_per_s"] == pytest.approx(40.0)
    assert speedup(100, 25) == 4.0
    assert math.isnan(speedup(100, 0))
