"""A load run's report (kvbench load against a server): per request rate, latency and throughput,
failures, the prefix-cache effect and the server's own metrics; and summary.json, its aggregates."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvbench.bench.metrics import succeeded, summarize
from kvbench.load.aggregate import aggregate, prefix_effect
from kvbench.report.document import Body, Section, failures_section
from kvbench.report.run import Row, Run, latency_values
from kvbench.report.tables import num, table

SUMMARY = "summary.json"


def summarize_run(run: Run) -> dict:
    """{"partial": bool, "slo", "same_prompts_each_rate", "points": {rate label: aggregates}}; points in the
    order they were run."""
    slo = run.spec.get("slo")
    by_rate: dict[str, list[dict]] = {}
    for r in run.records:
        by_rate.setdefault(r["request_rate"], []).append(r)
    points = {}
    for label, rs in by_rate.items():
        point = aggregate(rs, slo)
        if any(r.get("shared_prefix") for r in rs):  # a prefix-cache effect only where a request shares a prefix
            point.update(prefix_effect(rs))
        run_point = run.info.get("points", {}).get(label) or {}
        point["planned"] = run_point.get("planned", len(rs))
        point["client_cpu_s"], point["client_cpu_share"] = run_point.get("client_cpu_s"), run_point.get("client_cpu_share")
        points[label] = point
    return {"partial": run.partial, "slo": slo, "same_prompts_each_rate": run.spec.get("same_prompts_each_rate"),
            "points": points}


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


def body(run: Run, figures: Path | None) -> Body:  # a load report draws no figure
    summary = summarize_run(run)
    points = summary["points"]
    config, server = run.spec, run.info.get("server", {})
    workload = config.get("workload", {})
    headline = ("PARTIAL (interrupted) " if summary["partial"] else "") + "; ".join(
        f"rate {label}: {p['completed']}/{p['requests']} ok, {num(p['request_throughput'], 2)} req/s, "
        f"TTFT p50 {num(p['ttft_ms.p50'])} ms, TPOT p50 {num(p['tpot_ms.p50'], 2)} ms" for label, p in points.items())
    facts = (
        f"server: {config.get('url')} (`/{config.get('endpoint')}`), model `{server.get('model', config.get('model'))}`",
        f"workload: {workload.get('kind')} (prompt {workload.get('prompt_tokens')} tokens, max output "
        f"{workload.get('output_tokens')} tokens); burstiness {config.get('burstiness')}, max concurrency "
        f"{config.get('max_concurrency') or 'none'}, seed {config.get('seed')}",
        f"prompts: {_prompts_note(summary['same_prompts_each_rate'])}",
        f"SLO for goodput: {summary['slo'] or 'none given'}",
    )
    if any(p["client_cpu_s"] is not None for p in points.values()):  # run.json files before 2026-11 lack it
        facts += ("client CPU time (a client on the server's cores takes it from the server): " + "; ".join(
            f"rate {label} {num(p['client_cpu_s'], 2)} s, {num(_percent(p['client_cpu_share']), 1)}% of one core"
            for label, p in points.items()),)
    sections = [_latency(points),
                *failures_section({label: p["failures"] for label, p in points.items()}, "rate")]
    if any("ttft_new_over_shared" in p for p in points.values()):
        sections.append(_prefix_effect(points))
    sections.append(_server_metrics(run.info.get("points", {})))
    return Body(headline=headline, facts=facts, sections=tuple(sections),
                files=((SUMMARY, json.dumps(_null_non_finite(summary), indent=2, allow_nan=False)),))


def _latency(points: dict[str, dict]) -> Section:
    header = ("rate (req/s)", "ok / sent / planned", "req/s", "in tok/s", "out tok/s", "TTFT ms mean ± std",
              "TTFT p50 / p90 / p99", "TPOT ms mean ± std", "TPOT p50 / p90 / p99", "ITL ms p50 / p90 / p99",
              "E2E ms p50 / p90 / p99", "send lag ms p50 / p99", "goodput req/s")
    rows = [(label, f"{p['completed']} / {p['sent']} / {p['planned']}", num(p["request_throughput"], 2),
             num(p["input_token_throughput"]), num(p["output_token_throughput"]), _mean_std(p, "ttft_ms", 1),
             _pcts(p, "ttft_ms", 1), _mean_std(p, "tpot_ms", 2), _pcts(p, "tpot_ms", 2), _pcts(p, "itl_ms", 2),
             _pcts(p, "e2e_ms", 1), _pcts(p, "send_lag_ms", 2, ("p50", "p99")), num(p.get("goodput"), 2))
            for label, p in points.items()]
    return Section("Latency and throughput per request rate", tuple(table(header, rows)),
                   intro="TTFT: send to first generated text; TPOT: (E2E - TTFT) / (output tokens - 1); ITL: every gap "
                         "between streamed chunks; send lag: actual minus scheduled send. Latency statistics over "
                         "successful requests; throughputs over the rate's wall-clock duration.")


def _mean_std(p: dict, name: str, digits: int) -> str:
    """`mean ± std` from load aggregates (flat `name.stat` keys)."""
    mean, std = p[f"{name}.mean"], p[f"{name}.std"]
    return num(mean, digits) if not std or math.isnan(std) else f"{num(mean, digits)} ± {num(std, digits)}"


def _pcts(p: dict, name: str, digits: int, which=("p50", "p90", "p99")) -> str:
    return " / ".join(num(p[f"{name}.{stat}"], digits) for stat in which)


def _prefix_effect(points: dict[str, dict]) -> Section:
    rows = [(label, num(p["ttft_ms.new_prefix.p50"]), num(p["ttft_ms.shared_prefix.p50"]),
             num(p["ttft_new_over_shared"], 2), num(p["cached_tokens"], 0))
            for label, p in points.items() if "ttft_new_over_shared" in p]
    return Section("Prefix cache effect (TTFT of requests whose prefix is new vs already sent)", tuple(table(
        ("rate", "new prefix TTFT p50 ms", "shared prefix TTFT p50 ms", "new / shared", "cached tokens (server)"),
        rows)))


def _server_metrics(run_points: dict[str, dict]) -> Section:
    lines = []
    for label, point in run_points.items():
        metrics = point.get("server_metrics")
        if not metrics or not metrics.get("available"):
            lines.append(f"- rate {label}: unavailable (no /metrics endpoint, or the run was interrupted)")
            continue
        shown = {**metrics["counters"], **metrics["gauges"]}
        hit = metrics.get("prefix_cache_hit_rate")
        lines.append(f"- rate {label}: " + (f"prefix-cache hit rate {num(hit, 3)}; " if hit is not None else "")
                     + ", ".join(f"`{k}` {v:g}" for k, v in sorted(shown.items())))
    return Section("Server metrics (Prometheus /metrics, deltas over each rate's run)", tuple(lines))


def compare_rows(run: Run) -> list[Row]:
    """One row per request rate, keyed by the workload's prompt and output tokens."""
    workload = run.spec.get("workload") or {}
    rows = []
    for label, p in summarize_run(run)["points"].items():
        ok = [r for r in run.records if r["request_rate"] == label and succeeded(r)]
        # the asked-for length where the workload fixes one (as a suite's prompt_tokens), else the mean sent
        prompt = workload.get("prompt_tokens") if workload.get("kind") == "random" else \
            summarize(r["prompt_tokens"] for r in ok).mean
        rows.append(Row(
            dims={"prompt": num(prompt, 0), "output": str(workload.get("output_tokens", "?")), "rate": label},
            values={"n": f"{p['completed']}/{p['requests']}", **latency_values(ok), "req/s": num(p["request_throughput"], 2), "out tok/s": num(p["output_token_throughput"]),
                    "goodput req/s": num(p.get("goodput"), 2)},
        ))
    return rows


def _null_non_finite(value: object) -> object:
    """NaN and inf (a statistic without samples) as None: summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _null_non_finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _percent(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def _prompts_note(same: bool | None) -> str:
    if same is False:
        return "each rate its own (seeded by rate)"
    return "the same at every rate: a server's prefix cache is warm for every rate after the first"
