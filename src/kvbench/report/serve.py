"""A serve run's report (the in-process engine under open-loop arrivals): per point (engine x request rate)
throughput, latency, goodput, batch occupancy and KV bytes; latency per request class (stream); and
summary.json, each point's aggregates as the mean over its trials with their spread.

Each trial is summarised on its own (its duration runs from the first scheduled arrival to the last end),
then the trials are averaged. Only complete trials count: a trial cut mid-way (fewer records than its
schedule) and its steps are left out. Points are compared with the reference engine's on the same requests
(output length, greedy agreement) and an engine is picked per (rate, KV cap) in `serve_quality`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from kvbench.bench.metrics import summarize, throughput, timing_stats
from kvbench.bench.steps import STEPS, read_steps
from kvbench.report.document import Body, Section
from kvbench.report.load import _null_non_finite
from kvbench.report.run import Row, Run, latency_values
from kvbench.report.serve_quality import against_reference, choice_section, quality_section
from kvbench.report.tables import DASH, num, table

SUMMARY = "summary.json"
POINT_FIELDS = ("engine", "method", "kv_backend", "strategy", "budget", "max_num_seqs", "request_rate",
                "kv_cache_memory")
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms", "prefill_ms")


def trial_stats(records: list[dict], steps: list[dict], slo: dict[str, float] | None) -> dict[str, float]:
    """One trial of one point: throughputs over its wall time (first arrival to last end, `metrics.duration_s`),
    latency p50 / p99, and from its steps the batch and KV peaks."""
    tp = throughput(records, slo)
    stats = timing_stats(records)
    stats.update({f: summarize(r.get(f) for r in records) for f in ("queue_ms", "prefill_ms")})
    used = sum(s["kv_bytes_used"] for s in steps)
    moved = [r["bytes_moved"] for r in records if r.get("bytes_moved") is not None]
    scored = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    out = {"duration_s": tp.duration_s, "completed": tp.completed, "output_tokens": tp.output_tokens,
           "output_throughput": tp.output_token_throughput, "request_throughput": tp.request_throughput,
           "total_token_throughput": tp.total_token_throughput, "goodput": tp.goodput,
           "preemptions": sum(r.get("preemptions", 0) for r in records),
           "swaps": sum(r.get("swaps", 0) for r in records),
           "bytes_swapped": sum(s.get("bytes_swapped", 0) for s in steps),
           "peak_running": max((s["num_running"] for s in steps), default=None),
           "kv_reserved_bytes": max((s["kv_bytes_reserved"] for s in steps), default=None),
           "kv_used_bytes": max((s["kv_bytes_used"] for s in steps), default=None),
           # over every step: the bytes set aside per byte of KV actually held (internal fragmentation + promises)
           "kv_reserved_over_used": sum(s["kv_bytes_reserved"] for s in steps) / used if used else None,
           "steps": len(steps),
           # offload / fetch strategies: KV bytes brought to the compute device per output token
           "bytes_moved_per_token": sum(moved) / tp.output_tokens if moved and tp.output_tokens else None,
           # task accuracy where the workload knows the answers (needle): share of outputs holding them
           "accuracy": sum(scored) / len(scored) if scored else None}
    for name in LATENCIES:
        out.update({f"{name}.{p}": getattr(stats[name], p) for p in ("p50", "p99")})
    return out


def summarize_run(run: Run) -> dict:
    """{"partial", "slo", "points": {key: {point fields, "trials", metric: mean over trials, "metric.std": spread,
    "streams": {tag: pooled latencies}}}}, points in the order they were measured."""
    slo = run.spec.get("slo")
    planned = {key: p.get("requests") for key, p in run.info.get("points", {}).items()}
    by_trial: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in run.measured:
        by_trial[(r["point"], r["trial"])].append(r)
    complete = {k for k, rs in by_trial.items() if planned.get(k[0]) in (None, len(rs))}
    steps: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for s in read_steps(run.out / STEPS, complete):
        steps[(s["point"], s["trial"])].append(s)
    points: dict[str, dict] = {}
    for key, trial in sorted(complete, key=lambda k: (min(r["time"] for r in by_trial[k]), k)):
        points.setdefault(key, {"trial_stats": [], "records": []})
        points[key]["trial_stats"].append(trial_stats(by_trial[(key, trial)], steps[(key, trial)], slo))
        points[key]["records"] += by_trial[(key, trial)]
    summary = {key: _point(p) for key, p in points.items()}
    versus = against_reference({key: p["records"] for key, p in points.items()}, summary, reference_of(run.spec))
    return {"partial": run.partial, "slo": slo, "reference": reference_of(run.spec),
            "points": {key: {**p, **versus[key]} for key, p in summary.items()}}


def reference_of(spec: dict) -> str | None:
    """The engine outputs are compared with: the spec's `reference`, else its first engine."""
    return spec.get("reference") or next((e.get("label") for e in spec.get("engines") or ()), None)


def _point(p: dict) -> dict:
    first = p["records"][0]
    out: dict = {f: first.get(f) for f in POINT_FIELDS}
    out["trials"] = len(p["trial_stats"])
    for name in p["trial_stats"][0]:
        s = summarize(t[name] for t in p["trial_stats"])
        out[name], out[f"{name}.std"] = s.mean, s.std
    streams = defaultdict(list)
    for r in p["records"]:
        streams[r.get("stream", "main")].append(r)
    out["streams"] = {tag: _stream(rs) for tag, rs in streams.items()}
    return out


def _stream(records: list[dict]) -> dict:
    """One request class of a point, pooled over its trials."""
    stats = timing_stats(records)
    return {"requests": len(records), "prompt_tokens.mean": summarize(r["prompt_tokens"] for r in records).mean,
            **{f"{name}.{p}": getattr(stats[name], p) for name in ("ttft_ms", "tpot_ms", "itl_ms")
               for p in ("p50", "p99")}}


def body(run: Run, figures: Path | None) -> Body:
    summary = summarize_run(run)
    points = summary["points"]
    best = max(points.items(), key=lambda kv: kv[1]["output_throughput"] or 0, default=None)
    headline = ("PARTIAL (interrupted) " if summary["partial"] else "") + f"{len(points)} points" + (
        f"; highest output throughput {num(best[1]['output_throughput'])} tok/s at {best[0]} (TTFT p50 "
        f"{num(best[1]['ttft_ms.p50'])} ms, peak {num(best[1]['peak_running'], 0)} running)" if best else "")
    config = run.spec
    workload = config.get("workload", {})
    facts = (f"workload: {_lengths(workload)}; {len(run.measured)} requests measured; burstiness "
             f"{config.get('burstiness')}, seed {config.get('seed')}, EOS {'ignored' if config.get('ignore_eos') else 'honoured'}",
             *(f"stream `{s['tag']}`: {s['num_requests']} requests of {_lengths(s['workload'])} at rate "
               f"{s['request_rate']} from {s['start_s']} s" for s in config.get("streams") or ()),
             f"SLO for goodput: {summary['slo'] or 'none given'}",
             *([f"engine axes (every engine crossed with): {config['engine_axes']}"]
               if config.get("engine_axes") else []),
             f"reference engine (outputs compared with): `{summary['reference']}`",
             "engines: " + "; ".join(f"`{e['label']}` " + (", ".join(f"{k}={v}" for k, v in e.items() if k != "label")
                                                          or "defaults") for e in config.get("engines", ())))
    sections = [_throughput(points), _kv(points, run.info.get("points", {}))]
    if len({p["method"] for p in points.values()}) > 1 and any(p.get("comparable") for p in points.values()):
        sections += [quality_section(points, summary["reference"], not config.get("ignore_eos", True)),
                     choice_section(points, summary["reference"], summary["slo"])]
    if any(len(p["streams"]) > 1 for p in points.values()):
        sections.append(_classes(points))
    drawn: tuple[Path, ...] = ()
    if figures is not None and points:
        drawn = _figures(run, points, figures)
    return Body(headline=headline, facts=facts, sections=tuple(sections), figures=drawn,
                files=((SUMMARY, json.dumps(_null_non_finite(summary), indent=2, allow_nan=False)),))


def _lengths(workload: dict) -> str:
    def span(low, high):
        return f"{low}" if high is None else f"U[{low},{high}]"

    return (f"{workload.get('kind')}, prompt {span(workload.get('prompt_tokens'), workload.get('max_prompt_tokens'))}"
            f" tokens, output {span(workload.get('output_tokens'), workload.get('max_output_tokens'))} tokens")


def _ms(p: dict, name: str, digits: int = 1) -> str:
    return f"{num(p[f'{name}.p50'], digits)} / {num(p[f'{name}.p99'], digits)}"


def _spread(p: dict, name: str, digits: int = 1) -> str:
    std = p.get(f"{name}.std")
    return num(p[name], digits) if p["trials"] < 2 or std is None else f"{num(p[name], digits)} ± {num(std, digits)}"


def _throughput(points: dict[str, dict]) -> Section:
    header = ("point", "trials", "out tok/s", "req/s", "goodput req/s", "TTFT ms p50 / p99", "TPOT ms p50 / p99",
              "ITL ms p50 / p99", "E2E ms p50 / p99", "queue ms p50 / p99", "wall s")
    rows = [(key, str(p["trials"]), _spread(p, "output_throughput"), _spread(p, "request_throughput", 2),
             _spread(p, "goodput", 2), _ms(p, "ttft_ms"), _ms(p, "tpot_ms", 2), _ms(p, "itl_ms", 2), _ms(p, "e2e_ms"),
             _ms(p, "queue_ms"), _spread(p, "duration_s", 2)) for key, p in points.items()]
    return Section("Throughput and latency per point", tuple(table(header, rows)),
                   intro="A point is an engine at a request rate. Latencies run from each request's scheduled arrival "
                         "(queueing behind a busy engine included); queue: arrival to the start of the step that first "
                         "ran it. Throughputs: tokens or requests over the trial's wall time (first arrival to last "
                         "end). Each trial is summarised alone; cells are the mean over trials (± std with two or more).")


def _kv(points: dict[str, dict], run_points: dict[str, dict]) -> Section:
    header = ("point", "peak running", "KV reserved peak MiB", "KV used peak MiB", "reserved / used", "pool MiB",
              "preemptions", "swaps", "swapped MiB")
    mib = lambda x: None if x is None else x / 2**20  # noqa: E731
    rows = [(key, _spread(p, "peak_running", 1), num(mib(p["kv_reserved_bytes"])), num(mib(p["kv_used_bytes"])),
             num(p["kv_reserved_over_used"], 3), num(mib(run_points.get(key, {}).get("kv_pool_bytes"))),
             _spread(p, "preemptions", 1), _spread(p, "swaps", 1), num(mib(p.get("bytes_swapped"))))
            for key, p in points.items()]
    return Section("Batch and KV memory per point", tuple(table(header, rows)),
                   intro="From steps.jsonl. Used: bytes of the token slots holding computed KV; reserved: blocks held "
                         "or promised (a contiguous slab reserves max_model_len tokens). reserved / used: summed over "
                         "every step. Preemptions count recompute and swap alike; swaps: those that copied the request's blocks to the "
                         "host tier and back (swapped MiB: out + in; on a CPU a host-to-host copy, so bytes are "
                         "exact and time is not a GPU's PCIe transfer).")


def _classes(points: dict[str, dict]) -> Section:
    header = ("point", "stream", "requests", "prompt tokens", "TTFT ms p50 / p99", "TPOT ms p50 / p99",
              "ITL ms p50 / p99")
    rows = [(key, tag, str(s["requests"]), num(s["prompt_tokens.mean"], 0), _ms(s, "ttft_ms"), _ms(s, "tpot_ms", 2),
             _ms(s, "itl_ms", 2)) for key, p in points.items() for tag, s in p["streams"].items()]
    return Section("Latency per request class", tuple(table(header, rows)),
                   intro="Each stream of the spec on its own, pooled over the point's trials.")


def _figures(run: Run, points: dict[str, dict], figures: Path) -> tuple[Path, ...]:
    from kvbench.report.figures import pyplot, save

    plt = pyplot()
    drawn = []
    rates = list(dict.fromkeys(p["request_rate"] for p in points.values()))
    if len(rates) > 1:
        engines = list(dict.fromkeys(p["engine"] for p in points.values()))
        colors = plt.get_cmap("tab20" if len(engines) > 10 else "tab10")
        fig, (*axes, key) = plt.subplots(1, 4, figsize=(15, 3.8), width_ratios=(4, 4, 4, 2))
        for i, engine in enumerate(engines):  # one colour per engine: p50 solid, p99 dashed
            at = {p["request_rate"]: p for p in points.values() if p["engine"] == engine}
            x = [j for j, r in enumerate(rates) if r in at]
            for ax, name in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms")):
                color = colors(i % colors.N)
                ax.plot(x, [at[rates[j]][f"{name}.p50"] for j in x], marker="o", color=color,
                        label=engine if ax is axes[0] else None)
                ax.plot(x, [at[rates[j]][f"{name}.p99"] for j in x], marker="x", linestyle="--", color=color)
        for ax, name in zip(axes, ("TTFT", "TPOT", "E2E")):
            ax.set_xticks(range(len(rates)), rates)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(f"{name} ms (p50 solid, p99 dashed)")
            ax.set_yscale("log")
        key.axis("off")
        key.legend(*axes[0].get_legend_handles_labels(), loc="center left", fontsize=7)
        drawn.append(save(fig, figures / "latency_vs_rate.png", dpi=110))
    complete = {(key, 0) for key in points}
    steps = defaultdict(list)
    for s in read_steps(run.out / STEPS, complete):
        steps[s["point"]].append(s)
    if steps:
        fig, ax = plt.subplots(figsize=(8, 4))
        for key, ss in steps.items():
            line, = ax.plot([s["t_s"] for s in ss], [s["kv_bytes_used"] / 2**20 for s in ss], label=f"{key} used")
            ax.plot([s["t_s"] for s in ss], [s["kv_bytes_reserved"] / 2**20 for s in ss], linestyle=":",
                    color=line.get_color(), label=f"{key} reserved")
        ax.set_xlabel("seconds since the first arrival (trial 0)")
        ax.set_ylabel("KV MiB")
        ax.legend(fontsize=6, ncol=2)
        drawn.append(save(fig, figures / "kv_over_time.png", dpi=110))
    return tuple(drawn)


def compare_rows(run: Run) -> list[Row]:
    """One row per point, keyed by the workload's prompt and output tokens, the rate and the engine."""
    workload = run.spec.get("workload") or {}
    rows = []
    for key, p in summarize_run(run)["points"].items():
        ok = [r for r in run.measured if r["point"] == key and r.get("status", "ok") == "ok"]
        fixed = workload.get("kind") in ("synthetic", "random") and workload.get("max_prompt_tokens") is None
        prompt = workload.get("prompt_tokens") if fixed else summarize(r["prompt_tokens"] for r in ok).mean
        output = workload.get("output_tokens") if workload.get("max_output_tokens") is None else DASH
        rows.append(Row(
            dims={"prompt": num(prompt, 0), "output": str(output), "rate": p["request_rate"], "engine": p["engine"]},
            values={"n": str(len(ok)), **latency_values(ok), "req/s": num(p["request_throughput"], 2),
                    "out tok/s": num(p["output_throughput"]), "goodput req/s": num(p.get("goodput"), 2),
                    "peak running": num(p["peak_running"], 1)},
        ))
    return rows
