"""A reuse run's report: cold and warm TTFT per workload and mode, multi-turn, the per-tier break-even.

Every speedup sits next to its reuse ratio. "Cold" is request 0 of a sequence (nothing cached);
"warm" are requests 1.. of the same sequence. The speedup of a mode is the mean TTFT of `none` on
the same warm requests over the mean warm TTFT of the mode.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from kvbench.bench.metrics import summarize
from kvbench.report.document import Body, Section
from kvbench.report.run import Row, Run, latency_values
from kvbench.report.tables import DASH, mean_std, num, pcts, ratio, table

MODE_ORDER = {"none": 0, "prefix": 1, "chunk:none": 2, "chunk:selective": 3, "chunk:cacheblend": 4}


def groups(records: list[dict], *fields: str) -> dict[tuple, list[dict]]:
    out = defaultdict(list)
    for r in records:
        out[tuple(r.get(f) for f in fields)].append(r)
    return out


def mode_rows(records: list[dict]) -> list[dict]:
    """One row per (workload, mode, tier), `none` first; the `*_ms` fields are Summaries of their requests."""
    none = {(r["workload"], r["trial"], r["request_index"]): r["ttft_ms"] for r in records if r["reuse_mode"] == "none"}
    rows = []
    for key, group in groups(records, "workload", "reuse_mode", "recompute", "tier").items():
        workload, mode, recompute, tier = key
        warm = [r for r in group if r["request_index"] > 0]
        reference = summarize(none.get((r["workload"], r["trial"], r["request_index"])) for r in warm)
        warm_ttft = summarize(r["ttft_ms"] for r in warm)
        floor = summarize(r.get("floor_ms") for r in warm)
        rows.append({
            "key": key, "workload": workload, "mode": mode if recompute is None else f"{mode}:{recompute}", "tier": tier,
            "prompt_tokens": summarize(r["prompt_tokens"] for r in group).mean,
            "cold_ttft_ms": summarize(r["ttft_ms"] for r in group if r["request_index"] == 0),
            "warm_ttft_ms": warm_ttft, "none_ttft_ms": reference, "speedup": reference.mean / warm_ttft.mean,
            "reuse_ratio": summarize(r["reuse_ratio"] for r in warm).mean,
            "match_rate": summarize(None if r.get("greedy_match") is None else float(r["greedy_match"]) for r in warm).mean,
            "floor_ms": floor, "warm_over_floor": warm_ttft.mean / floor.mean,
        })
    return sorted(rows, key=lambda r: (r["workload"], MODE_ORDER.get(r["mode"], 9), r["tier"]))


def _size(workload: str) -> int:
    return int(workload.rsplit("-", 1)[1])


def break_even(rows: list[dict]) -> dict[str, int | None]:
    """Per tier, the shortest measured document at which a warm request beats recomputing it."""
    out: dict[str, int | None] = {}
    for row in sorted((r for r in rows if r["workload"].startswith("break-even-") and r["mode"] == "prefix"),
                      key=lambda r: _size(r["workload"])):
        out.setdefault(row["tier"], None)
        if out[row["tier"]] is None and row["speedup"] > 1:
            out[row["tier"]] = _size(row["workload"])
    return out


def body(run: Run, figures: Path | None) -> Body:
    records = run.measured
    rows = mode_rows(records)
    main = [r for r in rows if not r["workload"].startswith("break-even-")]
    sections = [_modes(main)]
    turns = [r for r in records if r.get("turn") is not None]
    if turns:
        sections.append(_turns(turns))
    even = [r for r in rows if r["workload"].startswith("break-even-")]
    if even:
        sections.append(_break_even(rows, even))
    drawn: tuple[Path, ...] = ()
    if figures is not None and main:
        drawn = (_ttft_figure(main, figures / "ttft.png"),)
    sequences = len({(r["point"], r["trial"]) for r in records})
    best = max(main, key=lambda r: r["speedup"] if r["speedup"] == r["speedup"] else -1, default=None)
    headline = f"{sequences} request sequences" + (
        f"; best warm TTFT speedup {best['speedup']:.2f}x ({best['workload']}, {best['mode']}, tier {best['tier']}, "
        f"reuse ratio {best['reuse_ratio']:.2f})" if best and best["mode"] != "none" else "")
    return Body(headline=headline, facts=(f"{sequences} request sequences, {len(records)} requests",),
                sections=tuple(sections), figures=drawn)


def _modes(rows: list[dict]) -> Section:
    header = ("workload", "mode", "tier", "prompt tokens", "cold TTFT ms mean ± std", "warm TTFT ms mean ± std",
              "warm p50 / p90 / p99", "speedup", "reuse ratio", "greedy match", "floor ms", "warm / floor")
    cells = [(r["workload"], r["mode"], r["tier"], num(r["prompt_tokens"], 0), mean_std(r["cold_ttft_ms"]),
              mean_std(r["warm_ttft_ms"]), pcts(r["warm_ttft_ms"]), ratio(r["speedup"]), num(r["reuse_ratio"], 2),
              num(r["match_rate"], 2), num(r["floor_ms"].mean), num(r["warm_over_floor"], 2)) for r in rows]
    return Section("Cold and warm TTFT per workload and mode", tuple(table(header, cells)),
                   intro="Cold: request 0 (nothing cached). Warm: requests 1.. of the same sequence. Speedup: `none`'s "
                         "mean TTFT on the same warm requests / the mode's mean warm TTFT. Floor: prefilling only the "
                         "uncached suffix against a ready cache, measured in the same run.")


def _turns(turns: list[dict]) -> Section:
    by_turn = groups(turns, "turn", "reuse_mode", "recompute")
    cells = []
    for turn in sorted({r["turn"] for r in turns}):
        none, prefix = by_turn.get((turn, "none", None), []), by_turn.get((turn, "prefix", None), [])
        n, p = summarize(r["ttft_ms"] for r in none), summarize(r["ttft_ms"] for r in prefix)
        cells.append((str(turn), num(summarize(r["prompt_tokens"] for r in none).mean, 0), mean_std(n), mean_std(p),
                      ratio(n.mean / p.mean if p.n else None), num(summarize(r["reuse_ratio"] for r in prefix).mean, 2)))
    return Section("Multi-turn: TTFT per turn", tuple(table(
        ("turn", "prompt tokens", "none ms mean ± std", "prefix ms mean ± std", "speedup", "reuse ratio"), cells)))


def _break_even(rows: list[dict], even: list[dict]) -> Section:
    tiers = sorted({r["tier"] for r in even if r["mode"] == "prefix"})
    cells = []
    for size in sorted({_size(r["workload"]) for r in even}):
        at = {r["tier"]: r for r in even if r["workload"] == f"break-even-{size}"}
        cells.append((str(size), num(at["-"]["warm_ttft_ms"].mean) if "-" in at else DASH,
                      *(f"{num(at[t]['warm_ttft_ms'].mean)} ({ratio(at[t]['speedup'])} at reuse ratio "
                        f"{num(at[t]['reuse_ratio'], 2)})" if t in at else DASH for t in tiers)))
    smallest = min(_size(r["workload"]) for r in even)
    lines = table(("document tokens", "recompute TTFT ms", *(f"{t} TTFT ms" for t in tiers)), cells)
    lines += [""] + [_break_even_line(tier, n, smallest) for tier, n in break_even(rows).items()]
    return Section("Loading against recomputing, per tier", tuple(lines))


def _break_even_line(tier: str, length: int | None, smallest: int) -> str:
    if length is None:
        return f"- **{tier}**: loading never beat recomputing at the measured lengths"
    if length == smallest:
        return f"- **{tier}**: loading beats recomputing at every measured length: the break-even is at or below {length} tokens"
    return f"- **{tier}**: loading beats recomputing from {length} tokens on (and not below)"


def _ttft_figure(rows: list[dict], path: Path) -> Path:
    import numpy as np

    from kvbench.report.figures import pyplot, save

    plt = pyplot()
    workloads = sorted({r["workload"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(workloads)), 4))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        at = {r["workload"]: r["warm_ttft_ms"] for r in rows if r["mode"] == mode}
        ax.bar(np.arange(len(workloads)) + i * width, [at[w].mean if w in at else np.nan for w in workloads], width,
               yerr=[at[w].std if w in at and at[w].n > 1 else 0 for w in workloads], capsize=2, label=mode)
    ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2, workloads, rotation=20, ha="right")
    ax.set_ylabel("warm TTFT (ms, mean ± std)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return save(fig, path, dpi=110)


def compare_rows(run: Run) -> list[Row]:
    """One row per workload, mode and tier: warm requests' latency next to the speedup and reuse ratio."""
    records = run.measured
    by_key = groups(records, "workload", "reuse_mode", "recompute", "tier")
    out = []
    for r in mode_rows(records):
        warm = [x for x in by_key[r["key"]] if x["request_index"] > 0]
        out.append(Row(
            dims={"workload": r["workload"], "mode": r["mode"], "tier": r["tier"],
                  "output": str(warm[0]["max_new_tokens"]) if warm else DASH},
            values={"n": str(len(warm)), **latency_values(warm), "speedup": ratio(r["speedup"]),
                    "reuse ratio": num(r["reuse_ratio"], 2)},
        ))
    return out

