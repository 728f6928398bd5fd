"""Pure functions from request records to a run's aggregates, named as in vLLM's serving benchmark.

Throughputs divide by the run's duration (start to the end of the last request); token sums and
latency statistics count successful requests only; goodput counts those that also meet every SLO.
Every statistic goes through `bench.metrics.summarize`.
"""

from __future__ import annotations

import math
from collections import Counter

from kvbench.bench.metrics import summarize
from kvbench.errors import KvbenchError

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "send_lag_ms")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
STATS = ("mean", "std", "p50", "p90", "p95", "p99", "max")


def parse_slo(text: str) -> dict[str, float]:
    """`ttft_ms=200,tpot_ms=50` -> {"ttft_ms": 200.0, "tpot_ms": 50.0}."""
    slo = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise KvbenchError(f"cannot read SLO {part!r}; write KEY=MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}, "
                               "e.g. ttft_ms=200,tpot_ms=50")
        try:
            limit = float(value)
        except ValueError:
            limit = float("nan")
        if not limit > 0 or math.isinf(limit):
            raise KvbenchError(f"SLO {key} must be a positive number of milliseconds, got {value.strip()!r}")
        slo[key] = limit
    if not slo:
        raise KvbenchError(f"empty SLO {text!r}; e.g. ttft_ms=200,tpot_ms=50")
    return slo


def meets_slo(record: dict, slo: dict[str, float]) -> bool:
    """A successful request within every limit; no TPOT (one output token) meets any TPOT limit."""
    if record["status"] != "ok":
        return False
    for key, limit in slo.items():
        value = record.get(key)
        if value is None and key == "tpot_ms":
            continue
        if value is None or value > limit:
            return False
    return True


def aggregate(records: list[dict], slo: dict[str, float] | None = None) -> dict[str, float | int | dict]:
    """Flat aggregates: `requests`, `sent`, `completed`, `failed`, `failures`, `duration_s`, throughputs,
    `goodput`, and `<latency>.<stat>` for each latency in LATENCIES (e.g. `ttft_ms.p99`)."""
    ok = [r for r in records if r["status"] == "ok"]
    ends = [r["end_s"] for r in records if r.get("end_s") is not None]
    duration = max(ends) if ends else float("nan")
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
    # prompt tokens are unknown when the server reports no usage and no tokenizer was given
    prompt = sum(r["prompt_tokens"] for r in ok) if all(r["prompt_tokens"] is not None for r in ok) else math.nan
    output = sum(r["output_tokens"] for r in ok)
    out: dict = {
        "requests": len(records),
        "sent": sum(r.get("sent_s") is not None for r in records),  # not those cancelled waiting for a slot
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "failures": dict(Counter(r["status"] for r in records if r["status"] != "ok")),
        "duration_s": duration,
        "request_throughput": per_s(len(ok)),
        "input_token_throughput": per_s(prompt),
        "output_token_throughput": per_s(output),
        "total_token_throughput": per_s(prompt + output),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "cached_tokens": _sum_known(r.get("cached_tokens") for r in ok),  # None: the server never said
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in ok)
        out["goodput"] = per_s(good)
        out["good_requests"] = good
    for name in LATENCIES:
        samples = [x for r in ok for x in r["itl_ms"]] if name == "itl_ms" else [r[name] for r in ok]
        out.update(_stats(name, samples))
    return out


def prefix_effect(records: list[dict]) -> dict[str, float]:
    """TTFT of requests whose prefix was new vs already sent, and their ratio (> 1: the cache helps)."""
    ok = [r for r in records if r["status"] == "ok" and r.get("prefix_id") is not None]
    first = summarize(r["ttft_ms"] for r in ok if not r["shared_prefix"])
    shared = summarize(r["ttft_ms"] for r in ok if r["shared_prefix"])
    return {"ttft_ms.new_prefix.p50": first.p50, "ttft_ms.shared_prefix.p50": shared.p50,
            "ttft_new_over_shared": first.p50 / shared.p50 if shared.n and first.n and shared.p50 > 0 else float("nan")}


def _sum_known(values) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _stats(name: str, samples: list[float]) -> dict[str, float]:
    summary = summarize(samples).to_dict()
    return {f"{name}.{stat}": summary[stat] for stat in STATS}
