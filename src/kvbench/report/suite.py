"""A suite run's report: latency and throughput per point, memory, quality, speedups, figures."""

from __future__ import annotations

import math
from pathlib import Path

from kvbench.bench.summary import (
    PointSummary,
    Speedup,
    accuracy_grid,
    agreement_warnings,
    kv_ratios,
    speedups,
    summarize_points,
)
from kvbench.report.document import Body, Section
from kvbench.report.run import Row, Run, latency_values
from kvbench.report.tables import DASH, mean_std, num, pcts, ratio, table
from kvbench.units import human_bytes


def body(run: Run, figures: Path | None) -> Body:
    points = summarize_points(run.records)
    baseline = run.spec.get("baseline")
    rows = speedups(points, baseline) if baseline else []
    drawn: tuple[Path, ...] = ()
    if figures is not None:
        from kvbench.report.suite_figures import write_figures

        drawn = tuple(write_figures(points, rows, kv_ratios(points), accuracy_grid(run.records), figures))
    n_warmup = sum(1 for r in run.records if r.get("warmup"))
    sections = [_latency(points), _memory(points)]
    if any(p.quality for p in points):
        sections.append(_quality(points))
    if rows:
        sections.append(_speedups(rows))
    return Body(
        headline=_headline(points, rows, baseline),
        facts=(f"{sum(p.n for p in points)} measured trials over {len(points)} points; {n_warmup} warmup runs excluded",
               f"memory figure: `{points[0].mem_kind}`"),
        warnings=tuple(agreement_warnings(points)),
        sections=tuple(sections),
        figures=drawn,
    )


def _headline(points: list[PointSummary], rows: list[Speedup], baseline: str | None) -> str:
    """The best speedup against the baseline, or the fastest point."""
    warnings = agreement_warnings(points)
    suffix = f"; {len(warnings)} quality warning(s) in the report" if warnings else ""
    if rows:
        best = max(rows, key=lambda r: r.e2e if not math.isnan(r.e2e) else -1)
        return (f"{len(points)} points; best end-to-end speedup {best.e2e:.2f}x ({best.strategy} vs {baseline} "
                f"at prompt {best.shape[1] or 'text'}, {best.shape[2]} new tokens){suffix}")
    fastest = min(points, key=lambda p: p.stats["e2e_ms"].mean)
    return f"{len(points)} points; fastest: {fastest.point} at {fastest.stats['e2e_ms'].mean:.1f} ms end-to-end{suffix}"


def _latency(points: list[PointSummary]) -> Section:
    header = ("point", "n", "prompt", "out", "TTFT ms mean ± std", "TTFT p50 / p90 / p99", "TPOT ms mean ± std",
              "ITL ms p50 / p99", "E2E ms mean ± std", "E2E p50 / p90 / p99", "decode tok/s mean ± std", "req/s",
              "tok/s")
    rows = []
    for p in points:
        t, e = p.stats["ttft_ms"], p.stats["e2e_ms"]
        rows.append((p.point, str(p.n), num(p.prompt_tokens, 0), num(p.output_tokens, 1), mean_std(t), pcts(t),
                     mean_std(p.stats["tpot_ms"], 2), pcts(p.stats["itl_ms"], 2, ("p50", "p99")), mean_std(e), pcts(e),
                     mean_std(p.stats["decode_tokens_per_s"]), num(p.throughput.request_throughput, 2),
                     num(p.throughput.output_token_throughput)))
    return Section("Latency and throughput", tuple(table(header, rows)),
                   intro="Requests run one after another: req/s and tok/s divide by the summed end-to-end times. "
                         "Spread over the trials of each point; ITL pools every gap between tokens.")


def _memory(points: list[PointSummary]) -> Section:
    rows = [(p.point, human_bytes(p.kv_cache_bytes), _bytes(p.prefill_peak_mem_bytes), _bytes(p.decode_peak_mem_bytes))
            for p in points]
    return Section("Memory", tuple(table(("point", "KV cache (exact)", "peak prefill", "peak decode"), rows)))


def _bytes(n: int | None) -> str:
    return DASH if n is None else human_bytes(n)


def _quality(points: list[PointSummary]) -> Section:
    ratios = kv_ratios(points)
    header = ("point", "KV cache", "KV vs dynamic", "decode tok/s", "TTFT ms", "greedy agreement", "top-1",
              "KL (nats)", "perplexity (dynamic)", "accuracy")
    rows = []
    for p in points:
        q = {k: v.mean for k, v in p.quality.items()}
        ppl = f"{num(q.get('perplexity'), 2)} ({num(q.get('reference_perplexity'), 2)})" if "perplexity" in q else DASH
        rows.append((p.point, human_bytes(p.kv_cache_bytes), num(ratios.get(p.point), 3),
                     num(p.stats["decode_tokens_per_s"].mean), num(p.stats["ttft_ms"].mean),
                     num(q.get("greedy_agreement"), 3), num(q.get("top1_agreement"), 3), num(q.get("kl_mean"), 4), ppl,
                     num(q.get("accuracy"), 2)))
    return Section("Quality next to memory and speed (against `dynamic` on the same prompts)", tuple(table(header, rows)))


def _speedups(rows: list[Speedup]) -> Section:
    cells = [(r.strategy, str(r.shape[1] or "text"), str(r.shape[2]), str(r.shape[3]), ratio(r.e2e), ratio(r.ttft),
              ratio(r.decode_ms)) for r in rows]
    return Section(f"Speedup against `{rows[0].baseline}` (ratio of mean times; > 1 is faster)",
                   tuple(table(("strategy", "prompt", "out", "batch", "end-to-end", "TTFT", "decode"), cells)))


def compare_rows(run: Run) -> list[Row]:
    """One row per point, keyed by prompt and output tokens, strategy and batch size."""
    by_point: dict[str, list[dict]] = {}
    for r in run.measured:
        by_point.setdefault(r["point"], []).append(r)
    return [Row(dims={"prompt": str(p.target_prompt_tokens or round(p.prompt_tokens)), "output": str(p.max_new_tokens),
                      "strategy": p.strategy, "batch": str(p.batch_size)},
                values={"n": str(p.n), **latency_values(by_point[p.point]), "req/s": num(p.throughput.request_throughput, 2),
                        "out tok/s": num(p.throughput.output_token_throughput), "KV cache": human_bytes(p.kv_cache_bytes)})
            for p in summarize_points(run.records)]
