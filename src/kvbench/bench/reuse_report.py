"""Reports of the reuse suites, from results.jsonl and run.json only.

Every speedup sits next to its reuse ratio. "Cold" is request 0 of a sequence (nothing cached);
"warm" are requests 1.. of the same sequence. The speedup of a mode is the mean TTFT of `none` on
the same warm requests over the mean warm TTFT of the mode.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from kvbench.bench.metrics import summarize
from kvbench.bench.plots import _pyplot
from kvbench.bench.preflight import human_bytes
from kvbench.bench.records import RESULTS, RUN_INFO, atomic_write_text, read_records, read_run_info, run_kind
from kvbench.errors import KvbenchError


def _f(x: float, digits: int = 1) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _groups(records, *fields):
    out = defaultdict(list)
    for r in records:
        out[tuple(r.get(f) for f in fields)].append(r)
    return out


def mode_rows(records: list[dict]) -> list[dict]:
    """One row per (workload, mode, tier), `none` first; the `*_ms` fields are Summaries of their requests."""
    none = {(r["workload"], r["trial"], r["request_index"]): r["ttft_ms"] for r in records if r["reuse_mode"] == "none"}
    rows = []
    for (workload, mode, recompute, tier), group in _groups(records, "workload", "reuse_mode", "recompute", "tier").items():
        warm = [r for r in group if r["request_index"] > 0]
        reference = summarize(none.get((r["workload"], r["trial"], r["request_index"])) for r in warm)
        warm_ttft = summarize(r["ttft_ms"] for r in warm)
        floor = summarize(r.get("floor_ms") for r in warm)
        rows.append({
            "workload": workload, "mode": mode if recompute is None else f"{mode}:{recompute}", "tier": tier,
            "prompt_tokens": summarize(r["prompt_tokens"] for r in group).mean,
            "cold_ttft_ms": summarize(r["ttft_ms"] for r in group if r["request_index"] == 0),
            "warm_ttft_ms": warm_ttft, "none_ttft_ms": reference, "speedup": reference.mean / warm_ttft.mean,
            "reuse_ratio": summarize(r["reuse_ratio"] for r in warm).mean,
            "match_rate": summarize(None if r.get("greedy_match") is None else float(r["greedy_match"]) for r in warm).mean,
            "floor_ms": floor, "warm_over_floor": warm_ttft.mean / floor.mean,
        })
    order = {"none": 0, "prefix": 1, "chunk:none": 2, "chunk:selective": 3, "chunk:cacheblend": 4}
    return sorted(rows, key=lambda r: (r["workload"], order.get(r["mode"], 9), r["tier"]))


def break_even(rows: list[dict]) -> dict[str, int | None]:
    """Per tier, the shortest measured document at which a warm request beats recomputing it."""
    out: dict[str, int | None] = {}
    for row in sorted((r for r in rows if r["workload"].startswith("break-even-") and r["mode"] == "prefix"),
                      key=lambda r: int(r["workload"].rsplit("-", 1)[1])):
        out.setdefault(row["tier"], None)
        if out[row["tier"]] is None and row["speedup"] > 1:
            out[row["tier"]] = int(row["workload"].rsplit("-", 1)[1])
    return out


def write_reuse_report(out: Path) -> Path:
    results = out / RESULTS
    if not results.exists():
        raise KvbenchError(f"{out} has no {RESULTS}; run a suite first")
    records = read_records(results, strict=False)
    if not records:
        raise KvbenchError(f"{results} holds no measured records yet")
    info = read_run_info(out)  # without run.json (lost, not yet written), the records still say what was measured
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    lines = [f"# {info.get('name', info.get('suite', records[0]['suite']))}", "", f"{info.get('spec', {}).get('description', '').strip()}", ""]
    env = info.get("environment", {})
    models = info.get("models") or dict.fromkeys(r["model"] for r in records)
    lines += [f"Model {', '.join(models)}; device {env.get('device_name', env.get('device', '?'))}; "
              f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}; git {env.get('git_commit', '?')}.", ""]
    if not info:
        lines += [f"{RUN_INFO} is missing: the environment above is unknown.", ""]
    lines += (_traffic(records, figures) if run_kind(out) == "traffic" else _reuse(records, figures))
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _reuse(records: list[dict], figures: Path) -> list[str]:
    rows = mode_rows(records)
    main = [r for r in rows if not r["workload"].startswith("break-even-")]
    lines = ["## Cold and warm TTFT per workload and mode", "",
             "Cold: request 0 (nothing cached). Warm: requests 1.. of the same sequence. Speedup: `none`'s TTFT on "
             "the same warm requests / the mode's warm TTFT. Floor: prefilling only the uncached suffix against a "
             "ready cache, measured in the same run.", "",
             "| workload | mode | prompt tokens | cold TTFT ms | warm TTFT ms | speedup | reuse ratio | greedy match | floor ms | warm / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in main:
        lines.append(f"| {r['workload']} | {r['mode']} | {r['prompt_tokens']:.0f} | {_f(r['cold_ttft_ms'].mean)} | "
                     f"{_f(r['warm_ttft_ms'].mean)} | {_f(r['speedup'], 2)}x | {_f(r['reuse_ratio'], 2)} | "
                     f"{_f(r['match_rate'], 2)} | {_f(r['floor_ms'].mean)} | {_f(r['warm_over_floor'], 2)} |")
    turns = [r for r in records if r.get("turn") is not None]
    if turns:
        lines += ["", "## Multi-turn: TTFT per turn", "", "| turn | prompt tokens | none ms | prefix ms | speedup | reuse ratio |", "|---|---|---|---|---|---|"]
        by_turn = _groups(turns, "turn", "reuse_mode", "recompute")
        for turn in sorted({r["turn"] for r in turns}):
            none, prefix = by_turn.get((turn, "none", None), []), by_turn.get((turn, "prefix", None), [])
            n, p = summarize(r["ttft_ms"] for r in none).mean, summarize(r["ttft_ms"] for r in prefix).mean
            lines.append(f"| {turn} | {summarize(r['prompt_tokens'] for r in none).mean:.0f} | {_f(n)} | {_f(p)} | "
                         f"{_f(n / p, 2)}x | {_f(summarize(r['reuse_ratio'] for r in prefix).mean, 2)} |")
    even = [r for r in rows if r["workload"].startswith("break-even-")]
    if even:
        lines += ["", "## Loading against recomputing, per tier", "",
                  "| document tokens | recompute TTFT ms | " + " | ".join(f"{t} TTFT ms" for t in sorted({r['tier'] for r in even if r['mode'] == 'prefix'})) + " |",
                  "|---|---|" + "---|" * len({r['tier'] for r in even if r['mode'] == 'prefix'})]
        tiers = sorted({r["tier"] for r in even if r["mode"] == "prefix"})
        for size in sorted({int(r["workload"].rsplit("-", 1)[1]) for r in even}):
            cells = {r["tier"]: r for r in even if r["workload"] == f"break-even-{size}"}
            lines.append(f"| {size} | {_f(cells['-']['warm_ttft_ms'].mean) if '-' in cells else '–'} | "
                         + " | ".join(f"{_f(cells[t]['warm_ttft_ms'].mean)} ({_f(cells[t]['speedup'], 2)}x at reuse ratio "
                                      f"{_f(cells[t]['reuse_ratio'], 2)})" if t in cells else "–" for t in tiers) + " |")
        points = break_even(rows)
        smallest = min(int(r["workload"].rsplit("-", 1)[1]) for r in even)
        lines += [""] + [_break_even_line(tier, n, smallest) for tier, n in points.items()]
    lines += ["", "![TTFT](figures/ttft.png)"]
    _ttft_figure(main, figures / "ttft.png")
    return lines


def _break_even_line(tier: str, length: int | None, smallest: int) -> str:
    if length is None:
        return f"- **{tier}**: loading never beat recomputing at the measured lengths"
    if length == smallest:
        return f"- **{tier}**: loading beats recomputing at every measured length: the break-even is at or below {length} tokens"
    return f"- **{tier}**: loading beats recomputing from {length} tokens on (and not below)"


def _ttft_figure(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    workloads = sorted({r["workload"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(workloads)), 4))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        values = [next((r["warm_ttft_ms"].mean for r in rows if r["workload"] == w and r["mode"] == mode), np.nan) for w in workloads]
        ax.bar(np.arange(len(workloads)) + i * width, values, width, label=mode)
    ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2, workloads, rotation=20, ha="right")
    ax.set_ylabel("warm TTFT (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stream_rows(records: list[dict]) -> list[dict]:
    """One row per traffic stream; the `*_ms` fields are Summaries of its requests (hits, misses, all)."""
    rows = []
    for (stream,), group in sorted(_groups(records, "stream").items()):
        group = sorted(group, key=lambda r: (r["trial"], r["request_index"]))
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


def _traffic(records: list[dict], figures: Path) -> list[str]:
    lines = ["## Request streams over a document pool", "",
             "| stream | requests | hit rate | reuse ratio | hit tokens from disk | mean TTFT ms | TTFT hit / miss ms | RAM at end | disk at end | RAM evictions |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in stream_rows(records):
        lines.append(f"| {r['stream']} | {r['requests']} | {r['hit_rate']:.2f} | {r['reuse_ratio']:.2f} | {r['from_disk']:.2f} | "
                     f"{r['ttft_ms'].mean:.1f} | {_f(r['hit_ttft_ms'].mean)} / {_f(r['miss_ttft_ms'].mean)} | "
                     f"{human_bytes(r['ram_bytes'])} | {human_bytes(r['disk_bytes'])} | {r['evictions']} |")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (stream,), group in sorted(_groups(records, "stream").items()):
        group.sort(key=lambda r: (r["trial"], r["request_index"]))
        first = [r for r in group if r["trial"] == group[0]["trial"]]
        hit = np.array([float(r["hit"]) for r in first])
        window = min(8, len(hit))
        ax.plot(np.convolve(hit, np.ones(window) / window, mode="valid"), label=stream)
    ax.set_xlabel("request")
    ax.set_ylabel("hit rate (rolling, 8 requests)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "hit_rate.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![hit rate over time](figures/hit_rate.png)"]
