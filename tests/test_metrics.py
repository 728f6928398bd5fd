"""The one metrics module: per-request timings from hand-made timestamps, and aggregates from hand-made records."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from kvbench.bench.metrics import (
    TIMING_FIELDS, duration_s, meets_slo, request_timing, speedup, summarize, throughput, timing_stats,
)

STEPS = [0.100, 0.120, 0.150, 0.160]  # when each decode step's tokens were on the host, s after the start


def test_request_timing_from_hand_made_steps():
    t = request_timing(STEPS, rows=2)
    assert t.ttft_ms == pytest.approx(100)
    assert t.itl_ms == pytest.approx([20, 30, 10])
    assert t.decode_ms == pytest.approx(60)
    assert t.e2e_ms == pytest.approx(160)
    assert t.tpot_ms == pytest.approx(20)  # (160 - 100) / (4 - 1)
    assert t.decode_tokens_per_s == pytest.approx(2 * 3 / 0.060)  # both rows count
    assert t.send_lag_ms is None  # no schedule in-process


def test_a_chunk_may_carry_several_tokens_tpot_counts_tokens_itl_counts_gaps():
    # three chunks from a send at t=10 s; the server's usage says 5 tokens (one chunk carried 3)
    t = request_timing([10.1, 10.2, 10.5], start_s=10.0, output_tokens=5, scheduled_s=9.99)
    assert t.ttft_ms == pytest.approx(100) and t.e2e_ms == pytest.approx(500)
    assert t.itl_ms == pytest.approx([100, 300])
    assert t.tpot_ms == pytest.approx(400 / 4)
    assert t.decode_tokens_per_s == pytest.approx(4 / 0.4)
    assert t.send_lag_ms == pytest.approx(10)


def test_single_token_has_no_tpot():
    t = request_timing([0.05])
    assert t.itl_ms == [] and t.tpot_ms is None and t.decode_tokens_per_s is None
    assert t.ttft_ms == t.e2e_ms == pytest.approx(50) and t.decode_ms == 0


def test_a_request_without_tokens_or_never_sent_has_no_token_latencies():
    for t in (request_timing([], start_s=1.0, output_tokens=0, scheduled_s=0.5), request_timing([0.2], start_s=None)):
        assert (t.ttft_ms, t.tpot_ms, t.decode_ms, t.e2e_ms, t.decode_tokens_per_s) == (None,) * 5
    assert request_timing([], start_s=1.0, scheduled_s=0.5).send_lag_ms == pytest.approx(500)
    failed = request_timing([], start_s=1.0, end_s=1.3, output_tokens=0)  # an HTTP 500: sent, answered, no token
    assert failed.e2e_ms == pytest.approx(300) and failed.ttft_ms is None and failed.decode_ms is None


def test_e2e_runs_to_the_end_of_the_response_when_it_comes_after_the_last_token():
    t = request_timing(STEPS, start_s=0.0, end_s=0.164)  # a stream's usage chunk and [DONE] 4 ms after the text
    assert t.e2e_ms == pytest.approx(164) and t.decode_ms == pytest.approx(64) and t.tpot_ms == pytest.approx(64 / 3)
    assert t.itl_ms == pytest.approx([20, 30, 10])  # gaps between tokens only


def _engine_record(step_times_s: list[float]) -> dict:
    """What the suite runner writes for one generation with these step times."""
    from kvbench.bench.suite import Point, parse_strategy
    from kvbench.bench.suite_session import _record
    from kvbench.engine.generate import GenerationResult

    result = GenerationResult(tokens=[list(range(len(step_times_s)))], prompt_lengths=[8], step_times_s=step_times_s,
                              kv_cache_bytes=0, peak_mem_bytes={"prefill": 1, "decode": 1}, mem_kind="test")
    spec = SimpleNamespace(name="t", workload=SimpleNamespace(kind="synthetic"))
    lm = SimpleNamespace(name="m", fingerprint="f", device="cpu", dtype="float32")
    point = Point("m", parse_strategy("dynamic"), 8, len(step_times_s), 1)
    return _record(spec, lm, point, SimpleNamespace(), 0, result, warmup=False)


def _http_record(sent: float, chunk_times: list[float], end: float) -> dict:
    """What the load client writes for one streamed request whose chunks arrived at these times."""
    from kvbench.load.stream import Trace
    from kvbench.workloads import Request

    trace = Trace(Request(0, ({"role": "user", "content": "hi"},), len(chunk_times)), scheduled_s=0.0, t0=sent,
                  sent=sent, chunks=list(chunk_times), pieces=["x"] * len(chunk_times), end=end,
                  usage={"prompt_tokens": 8, "completion_tokens": len(chunk_times)}, status="ok")
    return trace.record()


def test_the_engine_and_the_http_record_time_the_same_request_identically():
    engine = _engine_record(STEPS)
    http = _http_record(0.0, STEPS, end=STEPS[-1])  # the same clock: sent at 0, one token per chunk, no tail
    fields = ("ttft_ms", "itl_ms", "tpot_ms", "decode_ms", "e2e_ms", "decode_tokens_per_s")
    assert {f: engine[f] for f in fields} == {f: http[f] for f in fields}
    assert set(TIMING_FIELDS) <= set(engine) and set(TIMING_FIELDS) <= set(http)
    assert engine["tpot_ms"] == pytest.approx(20) and http["send_lag_ms"] == 0.0 and engine["send_lag_ms"] is None
    # on a perf_counter clock (large offsets) the same request agrees to rounding
    shifted = _http_record(5000.0, [5000.0 + t for t in STEPS], end=5000.0 + STEPS[-1])
    for f in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert shifted[f] == pytest.approx(engine[f], rel=1e-9)
    assert shifted["itl_ms"] == pytest.approx(engine["itl_ms"], rel=1e-9)
    tail = _http_record(0.0, STEPS, end=STEPS[-1] + 0.004)  # the end of the stream after the last text
    assert tail["e2e_ms"] == pytest.approx(164) and tail["tpot_ms"] == pytest.approx(64 / 3)


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


def engine_rec(e2e: float, out: int = 10, prompt: int = 20, batch: int = 1, ttft: float = 10.0) -> dict:
    return {"e2e_ms": e2e, "ttft_ms": ttft, "tpot_ms": (e2e - ttft) / (out - 1) if out > 1 else None,
            "itl_ms": [(e2e - ttft) / (out - 1)] * (out - 1) if out > 1 else [], "output_tokens": out, "prompt_tokens": prompt,
            "batch_size": batch}


def test_serial_in_process_throughput_lays_requests_back_to_back():
    records = [engine_rec(500, out=10, batch=2), engine_rec(1500, out=30, batch=2)]
    t = throughput(records)
    assert t.duration_s == pytest.approx(2.0)  # the sum of E2E
    assert t.completed == 4  # a batch record stands for each of its rows
    assert t.request_throughput == pytest.approx(2.0)
    assert t.output_token_throughput == pytest.approx((10 + 30) * 2 / 2.0)
    assert t.input_token_throughput == pytest.approx(20 * 4 / 2.0)
    assert t.total_token_throughput == pytest.approx(t.input_token_throughput + t.output_token_throughput)
    assert t.goodput is None and t.good_requests is None


def test_load_throughput_runs_from_the_run_start_to_the_last_end_and_counts_successes():
    ok = dict(engine_rec(400), status="ok", end_s=1.5)
    failed = {"status": "timeout", "end_s": 4.0, "e2e_ms": None, "output_tokens": 0, "prompt_tokens": None}
    t = throughput([ok, failed])
    assert t.duration_s == 4.0  # a failure still held the run open
    assert t.completed == 1 and t.request_throughput == pytest.approx(0.25)
    assert t.input_token_throughput == pytest.approx(20 / 4)  # failures' prompts are not counted


def test_empty_run_and_a_run_of_one_single_token_request():
    empty = throughput([])
    assert empty.completed == 0 and math.isnan(empty.duration_s) and math.isnan(empty.request_throughput)
    assert all(s.n == 0 for s in timing_stats([]).values())
    one = [engine_rec(40, out=1, ttft=40)]
    t, stats = throughput(one, {"tpot_ms": 1.0}), timing_stats(one)
    assert t.output_token_throughput == pytest.approx(1 / 0.040) and t.good_requests == 1  # no TPOT meets any TPOT SLO
    assert stats["tpot_ms"].n == 0 and stats["itl_ms"].n == 0 and stats["ttft_ms"].mean == 40


def test_goodput_counts_successful_requests_within_every_slo():
    records = [engine_rec(100, ttft=10), engine_rec(100, ttft=300), engine_rec(2000, ttft=10), engine_rec(100, batch=3)]
    t = throughput(records, {"ttft_ms": 100.0, "e2e_ms": 1000.0})
    assert t.good_requests == 1 + 3  # #1 misses TTFT, #2 misses E2E; the batch of 3 passes
    assert t.goodput == pytest.approx(4 / 2.3)
    assert not meets_slo({"status": "http_500", "ttft_ms": 1.0}, {"ttft_ms": 100.0})


def test_timing_stats_pool_every_gap_and_skip_failed_requests():
    records = [dict(engine_rec(40, out=4), status="ok"), dict(engine_rec(100, out=2), status="ok"),
               {"status": "http_500", "ttft_ms": 1e6, "itl_ms": [1e6]}]
    stats = timing_stats(records)
    assert stats["itl_ms"].n == 3 + 1 and stats["itl_ms"].max == pytest.approx(90)
    assert stats["ttft_ms"].n == 2 and stats["ttft_ms"].max == 10
    assert duration_s(records) == pytest.approx(0.140)  # no run clock on these records: their E2E back to back


def test_speedup():
    assert speedup(100, 25) == 4.0
    assert math.isnan(speedup(100, 0))


def test_queue_and_prefill_split_ttft_where_an_engine_scheduled_the_request():
    t = request_timing([2.0, 2.5], start_s=1.0, scheduled_s=1.0, first_scheduled_s=1.25)
    assert (t.queue_ms, t.prefill_ms, t.ttft_ms, t.send_lag_ms) == (250.0, 750.0, 1000.0, 0.0)
    plain = request_timing([2.0, 2.5], start_s=1.0)
    assert plain.queue_ms is None and plain.prefill_ms is None  # no engine schedule: suites, load
