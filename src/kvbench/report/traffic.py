"""A traffic run's report: hit rate, TTFT and memory per tier for each request stream over a document pool."""

from __future__ import annotations

from pathlib import Path

from kvbench.bench.metrics import summarize
from kvbench.report.document import Body, Section
from kvbench.report.run import Row, Run, latency_values
from kvbench.report.tables import mean_std, num, pcts, table
from kvbench.units import human_bytes

WINDOW = 8  # requests in the rolling hit rate of the figure


def streams(records: list[dict]) -> dict[str, list[dict]]:
    """Each stream's requests in the order they were sent."""
    by_stream: dict[str, list[dict]] = {}
    for r in records:
        by_stream.setdefault(r["stream"], []).append(r)
    return {stream: sorted(by_stream[stream], key=lambda r: (r["trial"], r["request_index"])) for stream in sorted(by_stream)}


def stream_rows(records: list[dict]) -> list[dict]:
    """One row per traffic stream; the `*_ms` fields are Summaries of its requests (hits, misses, all)."""
    rows = []
    for stream, group in streams(records).items():
        tier_tokens = sum(sum(r["tier_tokens"].values()) for r in group)
        rows.append({
            "stream": stream, "requests": len(group), "hit_rate": summarize(float(r["hit"]) for r in group).mean,
            "reuse_ratio": summarize(r["reuse_ratio"] for r in group).mean,
            "from_disk": sum(r["tier_tokens"].get("disk", 0) for r in group) / max(1, tier_tokens),
            "ttft_ms": summarize(r["ttft_ms"] for r in group),
            "hit_ttft_ms": summarize(r["ttft_ms"] for r in group if r["hit"]),
            "miss_ttft_ms": summarize(r["ttft_ms"] for r in group if not r["hit"]),
            "ram_bytes": group[-1]["ram_bytes"], "disk_bytes": group[-1]["disk_bytes"], "evictions": group[-1]["evictions"],
        })
    return rows


def body(run: Run, figures: Path | None) -> Body:
    by_stream = streams(run.measured)
    rows = stream_rows(run.measured)
    header = ("stream", "requests", "hit rate", "reuse ratio", "hit tokens from disk", "TTFT ms mean ± std",
              "TTFT p50 / p90 / p99", "TTFT hit / miss ms", "RAM at end", "disk at end", "RAM evictions")
    cells = [(r["stream"], str(r["requests"]), f"{r['hit_rate']:.2f}", num(r["reuse_ratio"], 2), f"{r['from_disk']:.2f}",
              mean_std(r["ttft_ms"]), pcts(r["ttft_ms"]), f"{num(r['hit_ttft_ms'].mean)} / {num(r['miss_ttft_ms'].mean)}",
              human_bytes(r["ram_bytes"]), human_bytes(r["disk_bytes"]), str(r["evictions"])) for r in rows]
    drawn = (_hit_rate_figure(by_stream, figures / "hit_rate.png"),) if figures is not None else ()
    return Body(headline=f"{len(rows)} streams; hit rate " + ", ".join(f"{r['stream']} {r['hit_rate']:.2f}" for r in rows),
                facts=(f"{len(rows)} streams, {sum(r['requests'] for r in rows)} requests",),
                sections=(Section("Request streams over a document pool", tuple(table(header, cells)),
                                  intro="Memory at the end of the stream's last trial."),),
                figures=drawn)


def _hit_rate_figure(by_stream: dict[str, list[dict]], path: Path) -> Path:
    import numpy as np

    from kvbench.report.figures import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    for stream, group in by_stream.items():
        first = [r for r in group if r["trial"] == group[0]["trial"]]
        hit = np.array([float(r["hit"]) for r in first])
        window = min(WINDOW, len(hit))
        ax.plot(np.convolve(hit, np.ones(window) / window, mode="valid"), label=stream)
    ax.set_xlabel("request")
    ax.set_ylabel(f"hit rate (rolling, {WINDOW} requests)")
    ax.legend(fontsize=8)
    return save(fig, path, dpi=110)


def compare_rows(run: Run) -> list[Row]:
    """One row per stream."""
    return [Row(dims={"stream": stream, "output": str(group[0]["max_new_tokens"])},
                values={"n": str(len(group)), **latency_values(group),
                        "hit rate": f"{summarize(float(r['hit']) for r in group).mean:.2f}"})
            for stream, group in streams(run.measured).items()]
