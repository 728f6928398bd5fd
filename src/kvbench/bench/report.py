"""`kvbench report OUT`: report.md and figures/*.png, from results.jsonl and run.json only."""

from __future__ import annotations

import math
from pathlib import Path

from kvbench.bench.plots import write_figures
from kvbench.bench.preflight import human_bytes
from kvbench.bench.records import RESULTS, atomic_write_text, read_records, read_run_info
from kvbench.bench.summary import (
    PointSummary,
    Speedup,
    accuracy_grid,
    agreement_warnings,
    kv_ratios,
    speedups,
    summarize_points,
)
from kvbench.errors import KvbenchError


def write_report(out: Path) -> Path:
    results = out / RESULTS
    if not results.exists():
        raise KvbenchError(f"{out} has no {RESULTS}; run a suite first (kvbench run SUITE --out {out})")
    records = read_records(results, strict=False)
    info = read_run_info(out)
    points = summarize_points(records)
    if not points:
        raise KvbenchError(f"{results} holds no measured records yet")
    baseline = (info.get("spec") or {}).get("baseline")
    rows = speedups(points, baseline) if baseline else []
    figures = write_figures(points, rows, kv_ratios(points), accuracy_grid(records), out / "figures")
    text = render(info, points, rows, figures, out, n_warmup=sum(1 for r in records if r.get("warmup")))
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


def one_line_summary(out: Path) -> str:
    """The headline of a run: the best speedup, or the fastest strategy."""
    info = read_run_info(out)
    points = summarize_points(read_records(out / RESULTS, strict=False))
    baseline = (info.get("spec") or {}).get("baseline")
    rows = speedups(points, baseline) if baseline else []
    warnings = agreement_warnings(points)
    suffix = f"; {len(warnings)} quality warning(s) in the report" if warnings else ""
    if rows:
        best = max(rows, key=lambda r: r.e2e if not math.isnan(r.e2e) else -1)
        return (f"{len(points)} points; best end-to-end speedup {best.e2e:.2f}x ({best.strategy} vs {baseline} "
                f"at prompt {best.shape[1] or 'text'}, {best.shape[2]} new tokens){suffix}")
    fastest = min(points, key=lambda p: p.stats["e2e_ms"].mean)
    return f"{len(points)} points; fastest: {fastest.point} at {fastest.stats['e2e_ms'].mean:.1f} ms end-to-end{suffix}"


def _f(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(info: dict, points: list[PointSummary], rows: list[Speedup], figures: list[Path], out: Path,
           n_warmup: int) -> str:
    env = info.get("environment", {})
    lines = [
        f"# kvbench report: {info.get('name', info.get('suite', out.name))}",
        "",
        (info.get("spec") or {}).get("description", "").strip(),
        "",
    ]
    lines += [f"- model: `{name}` ({m.get('dtype', '?')}, fingerprint `{m.get('fingerprint', '?')}`)"
              for name, m in info.get("models", {}).items()]
    lines += [
        f"- device: {env.get('device', '?')} ({env.get('device_name', '?')}), {env.get('torch_threads', '?')} torch threads",
        f"- versions: python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}, kvbench {env.get('kvbench', '?')}, commit `{env.get('git_commit')}`",
        f"- {sum(p.n for p in points)} measured trials over {len(points)} points; {n_warmup} warmup runs excluded",
        f"- memory figure: `{points[0].mem_kind}`",
    ]
    lines += [f"- note: {n}" for n in info.get("notes", [])]
    lines += [f"- **warning**: {w}" for w in agreement_warnings(points)]
    lines += [
        "",
        "## Latency and throughput",
        "",
        "| point | n | prompt | out | TTFT ms mean (p50 / p95 / p99) | TPOT ms | E2E ms mean ± std | E2E p50 / p95 / p99 "
        "| decode tok/s | req/s | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        t, e, d = p.stats["ttft_ms"], p.stats["e2e_ms"], p.stats["decode_tokens_per_s"]
        lines.append(
            f"| {p.point} | {p.n} | {_f(p.prompt_tokens, 0)} | {_f(p.output_tokens, 1)} "
            f"| {_f(t.mean)} ({_f(t.p50)} / {_f(t.p95)} / {_f(t.p99)}) | {_f(p.stats['tpot_ms'].mean, 2)} "
            f"| {_f(e.mean)} ± {_f(e.std)} | {_f(e.p50)} / {_f(e.p95)} / {_f(e.p99)} "
            f"| {_f(d.mean)} ± {_f(d.std)} | {_f(p.throughput.request_throughput, 2)} | {_f(p.throughput.output_token_throughput)} |"
        )
    lines += [
        "",
        "## Memory",
        "",
        "| point | KV cache (exact) | peak prefill | peak decode |",
        "|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.point} | {human_bytes(p.kv_cache_bytes)} | {_bytes_or_dash(p.prefill_peak_mem_bytes)} "
            f"| {_bytes_or_dash(p.decode_peak_mem_bytes)} |"
        )
    if any(p.quality for p in points):
        lines += _quality_table(points)
    if rows:
        lines += [
            "",
            f"## Speedup against `{rows[0].baseline}` (ratio of mean times; > 1 is faster)",
            "",
            "| strategy | prompt | out | batch | end-to-end | TTFT | decode |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            _, prompt, new, batch = r.shape
            lines.append(f"| {r.strategy} | {prompt or 'text'} | {new} | {batch} | {_f(r.e2e, 2)}x "
                         f"| {_f(r.ttft, 2)}x | {_f(r.decode_ms, 2)}x |")
    lines += ["", "## Figures", ""]
    lines += [f"![{f.stem}](figures/{f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def _bytes_or_dash(n: int | None) -> str:
    return "–" if n is None else human_bytes(n)


def _quality_table(points: list[PointSummary]) -> list[str]:
    ratios = kv_ratios(points)
    lines = [
        "",
        "## Quality next to memory and speed (against `dynamic` on the same prompts)",
        "",
        "| point | KV cache | KV vs dynamic | decode tok/s | TTFT ms | greedy agreement | top-1 | KL (nats) "
        "| perplexity (dynamic) | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        q = {k: v.mean for k, v in p.quality.items()}
        ppl = f"{_f(q.get('perplexity'), 2)} ({_f(q.get('reference_perplexity'), 2)})" if "perplexity" in q else "–"
        lines.append(
            f"| {p.point} | {human_bytes(p.kv_cache_bytes)} | {_f(ratios.get(p.point), 3)} "
            f"| {_f(p.stats['decode_tokens_per_s'].mean)} | {_f(p.stats['ttft_ms'].mean)} "
            f"| {_f(q.get('greedy_agreement'), 3)} | {_f(q.get('top1_agreement'), 3)} | {_f(q.get('kl_mean'), 4)} "
            f"| {ppl} | {_f(q.get('accuracy'), 2)} |"
        )
    return lines
