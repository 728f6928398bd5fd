"""A load run's aggregates as one flat dict (summary.json), named as in vLLM's serving benchmark.

Every definition (timings, throughputs over the run's duration, goodput) is `bench.metrics`'; this
module only lays them out flat and adds what only a load run has: failure counts, the server's
cached tokens and the prefix-cache effect.
"""

from __future__ import annotations

import math
from collections import Counter

from kvbench.bench.metrics import SLO_KEYS, succeeded, summarize, throughput, timing_stats
from kvbench.errors import KvbenchError

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


def aggregate(records: list[dict], slo: dict[str, float] | None = None) -> dict[str, float | int | dict]:
    """Flat aggregates: `requests`, `sent`, `failed`, `failures`, every field of `metrics.Throughput`
    (`goodput` None without an SLO), `cached_tokens`, and `<field>.<stat>` for each timing field (e.g. `ttft_ms.p99`)."""
    ok = [r for r in records if succeeded(r)]
    out: dict = {
        "requests": len(records),
        "sent": sum(r.get("sent_s") is not None for r in records),  # not those cancelled waiting for a slot
        "failed": len(records) - len(ok),
        "failures": dict(Counter(r["status"] for r in records if r["status"] != "ok")),
        **throughput(records, slo).to_dict(),
        "cached_tokens": _sum_known(r.get("cached_tokens") for r in ok),  # None: the server never said
    }
    for name, summary in timing_stats(records).items():
        values = summary.to_dict()
        out.update({f"{name}.{stat}": values[stat] for stat in STATS})
    return out


def prefix_effect(records: list[dict]) -> dict[str, float]:
    """TTFT of requests whose prefix was new vs already sent, and their ratio (> 1: the cache helps)."""
    ok = [r for r in records if succeeded(r) and r.get("prefix_id") is not None]
    first = summarize(r["ttft_ms"] for r in ok if not r["shared_prefix"])
    shared = summarize(r["ttft_ms"] for r in ok if r["shared_prefix"])
    return {"ttft_ms.new_prefix.p50": first.p50, "ttft_ms.shared_prefix.p50": shared.p50,
            "ttft_new_over_shared": first.p50 / shared.p50 if shared.n and first.n and shared.p50 > 0 else float("nan")}


def _sum_known(values) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
