"""Group measured records into per-point summaries; every statistic goes through `metrics.summarize`."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.bench.metrics import Summary, speedup, summarize, throughput

TIMED_FIELDS = ("ttft_ms", "tpot_ms", "e2e_ms", "decode_ms", "decode_tokens_per_s")


@dataclass(frozen=True)
class PointSummary:
    point: str
    strategy: str
    target_prompt_tokens: int | None
    prompt_tokens: float  # mean actual prompt length
    max_new_tokens: int
    output_tokens: float  # mean tokens generated per row
    batch_size: int
    n: int
    stats: dict[str, Summary]  # TIMED_FIELDS + "itl_ms" (all gaps pooled)
    requests_per_s: float
    tokens_per_s: float
    kv_cache_bytes: int
    peak_mem_bytes: int
    prefill_peak_mem_bytes: int | None
    decode_peak_mem_bytes: int | None
    mem_kind: str

    @property
    def shape(self) -> tuple:
        """What must match for two strategies to be compared."""
        return (self.target_prompt_tokens, self.max_new_tokens, self.batch_size)


def summarize_points(records: list[dict]) -> list[PointSummary]:
    """One summary per point, in first-seen order; warmup records are excluded."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if not r.get("warmup"):
            groups.setdefault(r["point"], []).append(r)
    return [_summarize_group(key, rs) for key, rs in groups.items()]


def _summarize_group(key: str, rs: list[dict]) -> PointSummary:
    first = rs[0]
    stats = {f: summarize(r.get(f) for r in rs) for f in TIMED_FIELDS}
    stats["itl_ms"] = summarize(x for r in rs for x in r.get("itl_ms", []))
    tput = throughput(
        [r["e2e_ms"] for r in rs], [r["batch_size"] for r in rs], [r["output_tokens"] * r["batch_size"] for r in rs]
    )
    return PointSummary(
        point=key,
        strategy=first["strategy"],
        target_prompt_tokens=first.get("target_prompt_tokens"),
        prompt_tokens=summarize(r["prompt_tokens"] for r in rs).mean,
        max_new_tokens=first["max_new_tokens"],
        output_tokens=summarize(r["output_tokens"] for r in rs).mean,
        batch_size=first["batch_size"],
        n=len(rs),
        stats=stats,
        requests_per_s=tput["requests_per_s"],
        tokens_per_s=tput["tokens_per_s"],
        kv_cache_bytes=max(r["kv_cache_bytes"] for r in rs),
        peak_mem_bytes=max(r["peak_mem_bytes"] for r in rs),
        prefill_peak_mem_bytes=_max_or_none(r.get("prefill_peak_mem_bytes") for r in rs),
        decode_peak_mem_bytes=_max_or_none(r.get("decode_peak_mem_bytes") for r in rs),
        mem_kind=first["mem_kind"],
    )


def _max_or_none(values) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


@dataclass(frozen=True)
class Speedup:
    strategy: str
    baseline: str
    shape: tuple
    e2e: float
    ttft: float
    decode_ms: float


def speedups(points: list[PointSummary], baseline: str) -> list[Speedup]:
    """Mean-latency ratios of each strategy against the baseline at the same prompt/output/batch."""
    base = {p.shape: p for p in points if p.strategy == baseline}
    rows = []
    for p in points:
        b = base.get(p.shape)
        if b is None or p.strategy == baseline:
            continue
        rows.append(Speedup(
            p.strategy, baseline, p.shape,
            e2e=speedup(b.stats["e2e_ms"].mean, p.stats["e2e_ms"].mean),
            ttft=speedup(b.stats["ttft_ms"].mean, p.stats["ttft_ms"].mean),
            decode_ms=speedup(b.stats["decode_ms"].mean, p.stats["decode_ms"].mean),
        ))
    return rows
