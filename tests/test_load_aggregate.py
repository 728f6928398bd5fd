import math

import pytest

from kvbench.bench.metrics import TIMING_FIELDS, meets_slo
from kvbench.errors import KvbenchError
from kvbench.load.aggregate import aggregate, parse_slo, prefix_effect


def rec(status="ok", ttft=10.0, e2e=40.0, out=4, prompt=8, end=1.0, itl=(10.0, 10.0, 10.0), **kw):
    r = {"status": status, "ttft_ms": ttft, "e2e_ms": e2e, "tpot_ms": (e2e - ttft) / (out - 1) if out > 1 else None,
         "itl_ms": list(itl), "output_tokens": out, "prompt_tokens": prompt, "cached_tokens": None, "end_s": end,
         "send_lag_ms": 0.5, "prefix_id": None, "shared_prefix": False}
    r.update(kw)
    return r


def test_throughputs_and_latency_stats_from_hand_made_records():
    records = [rec(end=1.0), rec(ttft=30.0, e2e=90.0, end=2.0, cached_tokens=5),
               rec(status="timeout", ttft=None, e2e=None, out=0, prompt=None, end=4.0, itl=())]
    a = aggregate(records)
    assert (a["requests"], a["completed"], a["failed"]) == (3, 2, 1)
    assert a["failures"] == {"timeout": 1}
    assert a["duration_s"] == 4.0
    assert a["request_throughput"] == pytest.approx(0.5)
    assert a["input_token_throughput"] == pytest.approx(16 / 4)
    assert a["output_token_throughput"] == pytest.approx(8 / 4)
    assert a["ttft_ms.mean"] == pytest.approx(20.0) and a["ttft_ms.p50"] == pytest.approx(20.0)
    assert a["ttft_ms.p99"] == pytest.approx(10 + 0.99 * 20)
    assert a["tpot_ms.mean"] == pytest.approx((10 + 20) / 2)
    assert a["itl_ms.p90"] == pytest.approx(10.0)  # every gap of the successful requests, pooled
    assert a["e2e_ms.max"] == 90.0
    assert a["cached_tokens"] == 5
    assert a["goodput"] is None and a["good_requests"] is None
    assert all(f"{field}.p99" in a for field in TIMING_FIELDS)


def test_unknown_prompt_counts_give_no_input_throughput():
    a = aggregate([rec(), rec(prompt=None)])
    assert math.isnan(a["input_token_throughput"]) and a["output_token_throughput"] == pytest.approx(8.0)


def test_empty_run_gives_zero_counts_and_nan_statistics():
    a = aggregate([])
    assert (a["requests"], a["completed"], a["failed"], a["cached_tokens"]) == (0, 0, 0, None)
    assert math.isnan(a["duration_s"]) and math.isnan(a["request_throughput"]) and math.isnan(a["ttft_ms.p99"])


def test_goodput_counts_successful_requests_within_every_slo():
    records = [rec(ttft=10, e2e=40), rec(ttft=300, e2e=330), rec(ttft=10, e2e=910), rec(status="http_500"),
               rec(ttft=5, e2e=5, out=1, itl=())]
    slo = {"ttft_ms": 100.0, "tpot_ms": 50.0}
    a = aggregate(records, slo)
    # ok: #0; #1 misses TTFT; #2 misses TPOT (300 ms); #3 failed; #4 has no TPOT (one token) and passes
    assert a["good_requests"] == 2
    assert a["goodput"] == pytest.approx(2 / 1.0)
    assert not meets_slo(rec(status="timeout"), {"ttft_ms": 1e9})


def test_slo_parsing():
    assert parse_slo("ttft_ms=200, tpot_ms=50") == {"ttft_ms": 200.0, "tpot_ms": 50.0}
    for bad, msg in [("ttft=200", "cannot read SLO"), ("ttft_ms", "cannot read SLO"), ("ttft_ms=-1", "positive"),
                     ("ttft_ms=abc", "positive"), ("", "empty SLO"), ("e2e_ms=inf", "positive")]:
        with pytest.raises(KvbenchError, match=msg):
            parse_slo(bad)


def test_prefix_effect_compares_new_and_shared_prefixes():
    records = [rec(ttft=100.0, prefix_id=0), rec(ttft=20.0, prefix_id=0, shared_prefix=True),
               rec(ttft=120.0, prefix_id=1), rec(ttft=30.0, prefix_id=1, shared_prefix=True)]
    e = prefix_effect(records)
    assert e["ttft_ms.new_prefix.p50"] == 110.0 and e["ttft_ms.shared_prefix.p50"] == 25.0
    assert e["ttft_new_over_shared"] == pytest.approx(4.4)
    assert math.isnan(prefix_effect([])["ttft_new_over_shared"])
