"""Group measured records into per-point summaries; every statistic goes through `metrics.summarize`."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.bench.metrics import Summary, Throughput, speedup, summarize, throughput, timing_stats

QUALITY_FIELDS = ("greedy_agreement", "top1_agreement", "kl_mean", "perplexity", "reference_perplexity", "accuracy")
AGREEMENT_WARNING = 0.9  # greedy agreement with dynamic below this gets a warning in reports


@dataclass(frozen=True)
class PointSummary:
    point: str
    model: str
    strategy: str  # the label: name plus the parameters the suite set
    strategy_name: str
    budget: float | int | None
    bits: int | None
    target_prompt_tokens: int | None
    prompt_tokens: float  # mean actual prompt length
    max_new_tokens: int
    output_tokens: float  # mean tokens generated per row
    batch_size: int
    n: int
    stats: dict[str, Summary]  # metrics.TIMING_FIELDS ("itl_ms": all gaps pooled)
    throughput: Throughput
    kv_cache_bytes: int
    peak_mem_bytes: int
    prefill_peak_mem_bytes: int | None
    decode_peak_mem_bytes: int | None
    mem_kind: str
    quality: dict[str, Summary]  # QUALITY_FIELDS present in the records

    @property
    def shape(self) -> tuple:
        """What must match for two strategies to be compared."""
        return (self.model, self.target_prompt_tokens, self.max_new_tokens, self.batch_size)


def summarize_points(records: list[dict]) -> list[PointSummary]:
    """One summary per point, in first-seen order; warmup records are excluded."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if not r.get("warmup"):
            groups.setdefault(r["point"], []).append(r)
    return [_summarize_group(key, rs) for key, rs in groups.items()]


def _summarize_group(key: str, rs: list[dict]) -> PointSummary:
    first = rs[0]
    return PointSummary(
        point=key,
        model=first["model"],
        strategy=first.get("strategy_label", first["strategy"]),
        strategy_name=first["strategy"],
        budget=first.get("budget"),
        bits=first.get("bits"),
        target_prompt_tokens=first.get("target_prompt_tokens"),
        prompt_tokens=summarize(r["prompt_tokens"] for r in rs).mean,
        max_new_tokens=first["max_new_tokens"],
        output_tokens=summarize(r["output_tokens"] for r in rs).mean,
        batch_size=first["batch_size"],
        n=len(rs),
        stats=timing_stats(rs),
        throughput=throughput(rs),
        kv_cache_bytes=max(r["kv_cache_bytes"] for r in rs),
        peak_mem_bytes=max(r["peak_mem_bytes"] for r in rs),
        prefill_peak_mem_bytes=_max_or_none(r.get("prefill_peak_mem_bytes") for r in rs),
        decode_peak_mem_bytes=_max_or_none(r.get("decode_peak_mem_bytes") for r in rs),
        mem_kind=first["mem_kind"],
        quality={f: summarize(r.get(f) for r in rs) for f in QUALITY_FIELDS if any(f in r for r in rs)},
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


def kv_ratios(points: list[PointSummary], reference: str = "dynamic") -> dict[str, float]:
    """KV bytes of each point over those of `reference` at the same shape (point key -> ratio)."""
    base = {p.shape: p.kv_cache_bytes for p in points if p.strategy == reference}
    return {p.point: p.kv_cache_bytes / base[p.shape] for p in points if base.get(p.shape)}


def agreement_warnings(points: list[PointSummary]) -> list[str]:
    """Points whose greedy output agrees with the full cache less often than AGREEMENT_WARNING."""
    out = []
    for p in points:
        agreement = p.quality.get("greedy_agreement")
        if agreement is not None and agreement.n and agreement.mean < AGREEMENT_WARNING:
            out.append(f"{p.point}: greedy agreement with dynamic is {agreement.mean:.2f} "
                       f"(< {AGREEMENT_WARNING}) on {p.model}")
    return out


def accuracy_grid(records: list[dict]) -> dict[str, dict[tuple[int, float], float]]:
    """Retrieval accuracy per strategy label, keyed by (context tokens, needle depth); warmups excluded."""
    cells: dict[str, dict[tuple[int, float], list[float]]] = {}
    for r in records:
        if r.get("warmup") or r.get("accuracy") is None:
            continue
        label = r.get("strategy_label", r["strategy"])
        cells.setdefault(label, {}).setdefault((r["target_prompt_tokens"], r["depth"]), []).append(r["accuracy"])
    return {label: {k: summarize(v).mean for k, v in grid.items()} for label, grid in cells.items()}
