"""Every timing and aggregate of kvbench, each defined once (docs/metrics.md says how and why).

`request_timing` turns one request's raw timestamps into its timing fields; the engine records
(suites, reuse, `kvbench generate`) and the HTTP load client's records both call it, so a field means
the same thing in every results.jsonl. `summarize`, `timing_stats` and `throughput` turn records
into a point's or a run's aggregates for the suite, reuse and load summaries. numpy only: the
load client installs without torch. Percentiles come from raw samples (numpy's linear
interpolation), never from buckets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (50, 90, 95, 99)
TIMING_FIELDS = ("ttft_ms", "itl_ms", "tpot_ms", "decode_ms", "e2e_ms", "decode_tokens_per_s", "send_lag_ms")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass(frozen=True)
class RequestTiming:
    """The timing fields every record carries; None where the request has no such time."""

    ttft_ms: float | None  # start -> first token
    itl_ms: list[float]  # every gap between consecutive token timestamps
    tpot_ms: float | None  # decode_ms / (output tokens - 1)
    decode_ms: float | None  # first token -> end (e2e_ms - ttft_ms)
    e2e_ms: float | None  # start -> end of the response
    decode_tokens_per_s: float | None  # rows * (output tokens - 1) / decode time
    send_lag_ms: float | None  # scheduled send -> actual send (the client's queue time); open-loop load only
    queue_ms: float | None  # arrival -> first scheduled by the engine; in-process serving only
    prefill_ms: float | None  # first scheduled -> first token; in-process serving only


def request_timing(token_times_s: Sequence[float], rows: int = 1, *, start_s: float | None = 0.0,
                   end_s: float | None = None, output_tokens: int | None = None,
                   scheduled_s: float | None = None, first_scheduled_s: float | None = None) -> RequestTiming:
    """Timings of one request, or of a batch of `rows` requests that share one clock, from its timestamps.

    `token_times_s`: when each token arrived, on the same clock as `start_s`: in-process the end of each
    decode step (one token per row, seconds after the generation started, so `start_s` is 0); over
    HTTP each chunk that carried generated text (a chunk may carry several tokens). `start_s`: when
    the request started (HTTP: the actual send; None: never sent). `end_s`: when the whole response
    was in (HTTP: the end of the stream, after the last text chunk; default: the last token).
    `output_tokens`: tokens generated per row (default one per timestamp; HTTP: the server's usage
    count). `scheduled_s`: when the request was due to be sent, for an open-loop schedule.
    `first_scheduled_s`: when a serving engine first scheduled the request (`start_s` is then its arrival).
    """
    ms = lambda a, b: None if a is None or b is None else (b - a) * 1000.0  # noqa: E731
    itl = [(b - a) * 1000.0 for a, b in zip(token_times_s, token_times_s[1:])]
    ttft = ms(start_s, token_times_s[0] if token_times_s else None)
    e2e = ms(start_s, token_times_s[-1] if end_s is None and token_times_s else end_s)
    decode = None if ttft is None or e2e is None else e2e - ttft
    tokens = len(token_times_s) if output_tokens is None else output_tokens
    steps = tokens - 1 if decode is not None and tokens > 1 else 0
    return RequestTiming(
        ttft_ms=ttft,
        itl_ms=itl,
        tpot_ms=decode / steps if steps else None,
        decode_ms=decode,
        e2e_ms=e2e,
        decode_tokens_per_s=rows * steps / (decode / 1000.0) if steps and decode > 0 else None,
        send_lag_ms=ms(scheduled_s, start_s),
        queue_ms=ms(start_s, first_scheduled_s),
        prefill_ms=ms(first_scheduled_s, token_times_s[0] if token_times_s else None),
    )


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples) -> Summary:
    """Mean, sample standard deviation (ddof=1), extremes and percentiles; NaN fields when empty."""
    values = np.asarray([s for s in samples if s is not None and not math.isnan(s)], dtype=float)
    if values.size == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan, nan, nan, nan)
    pct = np.percentile(values, PERCENTILES)
    return Summary(
        n=int(values.size),
        mean=float(values.mean()),
        std=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        min=float(values.min()),
        max=float(values.max()),
        p50=float(pct[0]),
        p90=float(pct[1]),
        p95=float(pct[2]),
        p99=float(pct[3]),
    )


def succeeded(record: dict) -> bool:
    """A load record says how it ended (`status`); an engine record exists only for a finished generation."""
    return record.get("status", "ok") == "ok"


def timing_stats(records: list[dict]) -> dict[str, Summary]:
    """A Summary of each timing field over the successful records; `itl_ms` pools every gap of every request."""
    ok = [r for r in records if succeeded(r)]
    return {f: summarize(x for r in ok for x in r.get(f) or []) if f == "itl_ms" else summarize(r.get(f) for r in ok)
            for f in TIMING_FIELDS}


def meets_slo(record: dict, slo: dict[str, float]) -> bool:
    """A successful request within every limit; no TPOT (one output token) meets any TPOT limit."""
    if not succeeded(record):
        return False
    for key, limit in slo.items():
        value = record.get(key)
        if value is None and key == "tpot_ms":
            continue
        if value is None or value > limit:
            return False
    return True


def duration_s(records: list[dict]) -> float:
    """The time over which a point's requests were served, the denominator of every throughput.

    Records on a run clock (`end_s`, seconds from the run's start: load runs) end it at the last
    request's end. A serial in-process point runs its requests one after another, between other
    points' turns and untimed work, so its duration is its requests laid back to back: the sum of
    their E2E. NaN without a request.
    """
    if any("end_s" in r for r in records):
        ends = [r["end_s"] for r in records if r.get("end_s") is not None]
        return max(ends) if ends else float("nan")
    busy = sum(r["e2e_ms"] for r in records if r.get("e2e_ms") is not None) / 1000.0
    return busy if busy > 0 else float("nan")


@dataclass(frozen=True)
class Throughput:
    duration_s: float
    completed: int  # successful requests; a batch record counts each of its rows
    prompt_tokens: float  # NaN when a successful request's prompt length is unknown
    output_tokens: int
    request_throughput: float  # completed / duration, requests/s
    input_token_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    good_requests: int | None  # None without an SLO
    goodput: float | None  # good_requests / duration

    def to_dict(self) -> dict:
        return asdict(self)


def throughput(records: list[dict], slo: dict[str, float] | None = None) -> Throughput:
    """Requests and tokens per second of `duration_s`, counting successful requests; goodput under `slo`."""
    ok = [r for r in records if succeeded(r)]
    duration = duration_s(records)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
    completed = sum(_rows(r) for r in ok)
    # prompt tokens are unknown when a server reports no usage and no tokenizer was given
    known = all(r.get("prompt_tokens") is not None for r in ok)
    prompt = sum(r["prompt_tokens"] * _rows(r) for r in ok) if known else float("nan")
    output = sum(r["output_tokens"] * _rows(r) for r in ok)
    good = sum(_rows(r) for r in ok if meets_slo(r, slo)) if slo else None
    return Throughput(
        duration_s=duration,
        completed=completed,
        prompt_tokens=prompt,
        output_tokens=output,
        request_throughput=per_s(completed),
        input_token_throughput=per_s(prompt),
        output_token_throughput=per_s(output),
        total_token_throughput=per_s(prompt + output),
        good_requests=good,
        goodput=None if good is None else per_s(good),
    )


def _rows(record: dict) -> int:
    """Requests one record stands for: an engine record of a batch times its rows together."""
    return record.get("batch_size", 1)


def speedup(baseline_ms: float, candidate_ms: float) -> float:
    """How many times faster the candidate is (baseline time / candidate time)."""
    if candidate_ms <= 0 or math.isnan(candidate_ms) or math.isnan(baseline_ms):
        return float("nan")
    return baseline_ms / candidate_ms
