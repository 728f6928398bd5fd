"""summary.json and report.md of a load run, from results.jsonl and run.json only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvbench.bench.records import RESULTS, atomic_write_text, read_records, read_run_info
from kvbench.load.aggregate import aggregate, prefix_effect
from kvbench.errors import KvbenchError

SUMMARY = "summary.json"


def summarize_run(out: Path) -> dict:
    """{"partial": bool, "points": {rate label: aggregates}}; points in the order they were run."""
    if not (out / RESULTS).exists():
        raise KvbenchError(f"{out} has no {RESULTS}; run kvbench load --out {out} first")
    records = read_records(out / RESULTS, strict=False)
    info = read_run_info(out)
    spec = info.get("spec") or info.get("config") or {}  # `config`: run.json of load runs before the one runner
    slo = spec.get("slo")
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["request_rate"], []).append(r)
    points = {}
    for label, rs in groups.items():
        point = aggregate(rs, slo)
        if any(r.get("shared_prefix") for r in rs):  # a prefix-cache effect only where a request shares a prefix
            point.update(prefix_effect(rs))
        run_point = info.get("points", {}).get(label) or {}
        point["planned"] = run_point.get("planned", len(rs))
        point["client_cpu_s"], point["client_cpu_share"] = run_point.get("client_cpu_s"), run_point.get("client_cpu_share")
        points[label] = point
    partial = info.get("complete") is False or info.get("partial", False)
    return {"partial": partial, "slo": slo, "same_prompts_each_rate": spec.get("same_prompts_each_rate"), "points": points}


def write_load_report(out: Path) -> Path:
    summary = summarize_run(out)
    atomic_write_text(out / SUMMARY, json.dumps(_null_non_finite(summary), indent=2, allow_nan=False))
    path = out / "report.md"
    atomic_write_text(path, render(read_run_info(out), summary))
    return path


def one_line(out: Path) -> str:
    summary = json.loads((out / SUMMARY).read_text())
    parts = [f"rate {label}: {p['completed']}/{p['requests']} ok, {_f(p['request_throughput'], 2)} req/s, "
             f"TTFT p50 {_f(p['ttft_ms.p50'])} ms, TPOT p50 {_f(p['tpot_ms.p50'], 2)} ms"
             for label, p in summary["points"].items()]
    return ("PARTIAL (interrupted) " if summary["partial"] else "") + "; ".join(parts)


def failures_line(summary: dict) -> str | None:
    """`failed: rate inf 17 of 20 (http_500 12, timeout 5)` over the rates with failures; None when none failed."""
    parts = [f"rate {label} {p['failed']} of {p['requests']} ("
             + ", ".join(f"{reason} {n}" for reason, n in sorted(p["failures"].items(), key=lambda kv: (-kv[1], kv[0]))) + ")"
             for label, p in summary["points"].items() if p["failed"]]
    return "failed: " + "; ".join(parts) if parts else None


def over_error_rate(summary: dict, limit: float) -> list[str]:
    """The rates whose share of failed requests is above `limit`, as `rate inf: 17 of 20 failed`."""
    return [f"rate {label}: {p['failed']} of {p['requests']} failed" for label, p in summary["points"].items()
            if p["requests"] and p["failed"] / p["requests"] > limit]


def _null_non_finite(value: object) -> object:
    """NaN and inf (a statistic without samples) as None: summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _null_non_finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _f(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _percent(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def _prompts_note(same: bool | None) -> str:
    if same is False:
        return "each rate its own (seeded by rate)"
    return "the same at every rate: a server's prefix cache is warm for every rate after the first"


def render(info: dict, summary: dict) -> str:
    config, env, server = info.get("spec") or info.get("config", {}), info.get("environment", {}), info.get("server", {})
    workload = config.get("workload", {})
    lines = [f"# kvbench load report: {server.get('model', config.get('model'))}", ""]
    if summary["partial"]:
        lines += ["**PARTIAL: the run was interrupted; the tables cover the requests that were sent.**", ""]
    lines += [
        f"- server: {config.get('url')} (`/{config.get('endpoint')}`), model `{server.get('model')}`",
        f"- workload: {workload.get('kind')} (prompt {workload.get('prompt_tokens')} tokens, max output "
        f"{workload.get('output_tokens')} tokens); burstiness {config.get('burstiness')}, max concurrency "
        f"{config.get('max_concurrency') or 'none'}, seed {config.get('seed')}",
        f"- prompts: {_prompts_note(summary['same_prompts_each_rate'])}",
        f"- SLO for goodput: {summary['slo'] or 'none given'}",
        f"- client: python {env.get('python')}, kvbench {env.get('kvbench')}, {env.get('cpu')} "
        f"({env.get('cpu_count')} CPUs), commit `{env.get('git_commit')}`",
        "- client CPU time (a client on the server's cores takes it from the server): "
        + "; ".join(f"rate {label} {_f(p['client_cpu_s'], 2)} s, {_f(_percent(p['client_cpu_share']), 1)}% of one core"
                    for label, p in summary["points"].items()),
        "",
        "## Latency and throughput per request rate",
        "",
        "TTFT: send to first generated text; TPOT: (E2E - TTFT) / (output tokens - 1); ITL: every gap between "
        "streamed chunks; send lag: actual minus scheduled send. Latency statistics over successful requests.",
        "",
        "| rate (req/s) | ok / sent / planned | req/s | in tok/s | out tok/s | TTFT ms mean / p50 / p99 "
        "| TPOT ms mean / p99 | ITL ms p50 / p99 | E2E ms p50 / p99 | send lag ms p99 | goodput req/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, p in summary["points"].items():
        lines.append(
            f"| {label} | {p['completed']} / {p['sent']} / {p['planned']} | {_f(p['request_throughput'], 2)} "
            f"| {_f(p['input_token_throughput'])} | {_f(p['output_token_throughput'])} "
            f"| {_f(p['ttft_ms.mean'])} / {_f(p['ttft_ms.p50'])} / {_f(p['ttft_ms.p99'])} "
            f"| {_f(p['tpot_ms.mean'], 2)} / {_f(p['tpot_ms.p99'], 2)} | {_f(p['itl_ms.p50'], 2)} / {_f(p['itl_ms.p99'], 2)} "
            f"| {_f(p['e2e_ms.p50'])} / {_f(p['e2e_ms.p99'])} | {_f(p['send_lag_ms.p99'], 2)} "
            f"| {_f(p.get('goodput'), 2)} |"
        )
    failures = {label: p["failures"] for label, p in summary["points"].items() if p["failures"]}
    if failures:
        lines += ["", "## Failed requests", "", "| rate | reason | count |", "|---|---|---|"]
        lines += [f"| {label} | {reason} | {n} |" for label, f in failures.items() for reason, n in f.items()]
    if any("ttft_new_over_shared" in p for p in summary["points"].values()):
        lines += ["", "## Prefix cache effect (TTFT of requests whose prefix is new vs already sent)", "",
                  "| rate | new prefix TTFT p50 ms | shared prefix TTFT p50 ms | new / shared | cached tokens (server) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {_f(p['ttft_ms.new_prefix.p50'])} | {_f(p['ttft_ms.shared_prefix.p50'])} "
                  f"| {_f(p['ttft_new_over_shared'], 2)} | {_f(p['cached_tokens'], 0)} |"
                  for label, p in summary["points"].items() if "ttft_new_over_shared" in p]
    lines += ["", "## Server metrics (Prometheus /metrics, deltas over each rate's run)", ""]
    for label, point in info.get("points", {}).items():
        metrics = point.get("server_metrics")
        if not metrics or not metrics.get("available"):
            lines.append(f"- rate {label}: unavailable (no /metrics endpoint, or the run was interrupted)")
            continue
        shown = {**metrics["counters"], **metrics["gauges"]}
        hit = metrics.get("prefix_cache_hit_rate")
        lines.append(f"- rate {label}: " + (f"prefix-cache hit rate {_f(hit, 3)}; " if hit is not None else "")
                     + ", ".join(f"`{k}` {v:g}" for k, v in sorted(shown.items())))
    return "\n".join(lines) + "\n"
