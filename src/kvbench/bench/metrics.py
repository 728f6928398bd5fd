"""Pure functions from raw per-step timestamps to per-request timings and summaries.

Definitions (as in vLLM's serving benchmark):
- TTFT: start of the request to the first generated token on the host (includes prefill).
- ITL: gap between consecutive generated tokens; every gap is kept as a raw sample.
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined for a single output token.
- decode time: first token to last token; decode tokens/s counts every batch row.
Percentiles are computed from raw samples (numpy's linear interpolation), never from buckets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class RequestTiming:
    ttft_ms: float
    itl_ms: list[float]
    tpot_ms: float | None
    decode_ms: float
    e2e_ms: float
    decode_tokens_per_s: float | None


def request_timing(step_times_s: list[float], batch_size: int = 1) -> RequestTiming:
    """Timings of one request (or one batch) from the times its decode steps finished."""
    if not step_times_s:
        raise ValueError("a request with no generated token has no timing")
    ms = [t * 1000.0 for t in step_times_s]
    itl = [b - a for a, b in zip(ms, ms[1:])]
    decode_ms = ms[-1] - ms[0]
    steps = len(ms) - 1
    return RequestTiming(
        ttft_ms=ms[0],
        itl_ms=itl,
        tpot_ms=decode_ms / steps if steps else None,
        decode_ms=decode_ms,
        e2e_ms=ms[-1],
        decode_tokens_per_s=batch_size * steps / (decode_ms / 1000.0) if steps and decode_ms > 0 else None,
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


def throughput(e2e_ms: list[float], requests_per_sample: list[int], tokens_per_sample: list[int]) -> dict:
    """Requests/s and output tokens/s of requests served one after another."""
    busy_s = sum(e2e_ms) / 1000.0
    if busy_s <= 0:
        return {"requests_per_s": float("nan"), "tokens_per_s": float("nan")}
    return {"requests_per_s": sum(requests_per_sample) / busy_s, "tokens_per_s": sum(tokens_per_sample) / busy_s}


def speedup(baseline_ms: float, candidate_ms: float) -> float:
    """How many times faster the candidate is (baseline time / candidate time)."""
    if candidate_ms <= 0 or math.isnan(candidate_ms) or math.isnan(baseline_ms):
        return float("nan")
    return baseline_ms / candidate_ms
