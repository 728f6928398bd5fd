"""A reuse run's report: cold and warm TTFT per workload and mode, quality against no reuse, multi-turn,
the per-tier break-even.

Every speedup sits next to its reuse ratio. "Cold" is request 0 of a sequence (nothing cached);
"warm" are requests 1.. of the same sequence. The speedup of a mode is the mean TTFT of `none` on
the same warm requests over the mean warm TTFT of the mode. Chunk modes are held to the quality bar
(`kvbench.reuse.bar`); a workload below it is a warning of the report.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from kvbench.bench.metrics import summarize
from kvbench.report.document import Body, Section
from kvbench.report.run import Row, Run, latency_values
from kvbench.report.tables import DASH, mean_std, num, pcts, ratio, table
from kvbench.reuse.bar import BAR

MODE_ORDER = {"none": 0, "prefix": 1, "chunk:none": 2, "chunk:selective": 3, "chunk:cacheblend": 4}


def groups(records: list[dict], *fields: str) -> dict[tuple, list[dict]]:
    out = defaultdict(list)
    for r in records:
        out[tuple(r.get(f) for f in fields)].append(r)
    return out


def mode_of(record: dict) -> str:
    """The mode as the spec wrote it (records before budgets were written: composed from its parts)."""
    if "mode" in record:
        return record["mode"]
    return record["reuse_mode"] if record["recompute"] is None else f"{record['reuse_mode']}:{record['recompute']}"


def _order(mode: str) -> tuple:
    base = mode if mode.count(":") < 2 else mode.rsplit(":", mode.count(":") - 1)[0]
    budget = mode.removeprefix(base)
    return MODE_ORDER.get(base, 9), tuple(float(x) for x in re.findall(r"\d+(?:\.\d+)?", budget)), budget


def mode_rows(records: list[dict]) -> list[dict]:
    """One row per (workload, mode, tier), `none` first; the `*_ms` fields are Summaries of their requests."""
    records = [{**r, "mode": mode_of(r)} for r in records]
    none = {(r["workload"], r["trial"], r["request_index"]): r for r in records if r["reuse_mode"] == "none"}
    rows = []
    for key, group in groups(records, "workload", "mode", "tier").items():
        workload, mode, tier = key
        warm = [r for r in group if r["request_index"] > 0]
        same = [none.get((r["workload"], r["trial"], r["request_index"])) for r in warm]
        reference = summarize(n and n["ttft_ms"] for n in same)
        warm_ttft = summarize(r["ttft_ms"] for r in warm)
        floor = summarize(r.get("floor_ms") for r in warm)
        quality = _quality(warm, same)
        rows.append({
            "key": key, "workload": workload, "mode": mode, "tier": tier, **quality,
            "shortfalls": BAR.shortfalls(quality["top1"], quality["accuracy"], quality["none_accuracy"])
            if mode.startswith("chunk") else (),
            "prompt_tokens": summarize(r["prompt_tokens"] for r in group).mean,
            "cold_ttft_ms": summarize(r["ttft_ms"] for r in group if r["request_index"] == 0),
            "warm_ttft_ms": warm_ttft, "none_ttft_ms": reference, "speedup": reference.mean / warm_ttft.mean,
            "reuse_ratio": summarize(r["reuse_ratio"] for r in warm).mean,
            "match_rate": summarize(None if r.get("greedy_match") is None else float(r["greedy_match"]) for r in warm).mean,
            "floor_ms": floor, "warm_over_floor": warm_ttft.mean / floor.mean,
        })
    return sorted(rows, key=lambda r: (r["workload"], _order(r["mode"]), r["tier"]))


def _quality(warm: list[dict], none: list[dict | None]) -> dict:
    """Means over the warm requests of their agreement with no reuse, and task accuracy next to no reuse's on the
    same requests (None where the run did not measure it)."""
    def mean(values):
        s = summarize(None if v is None else float(v) for v in values)
        return s.mean if s.n else None

    diverged = [r["first_divergence"] for r in warm if r.get("first_divergence") is not None]
    return {
        "greedy_agreement": mean(r.get("greedy_agreement") for r in warm),
        "diverged": len(diverged), "first_divergence": mean(diverged),
        "top1": mean(r.get("top1_agreement") for r in warm), "kl": mean(r.get("kl_mean") for r in warm),
        "recomputed": mean(r.get("recomputed_tokens") for r in warm),
        "accuracy": mean(r.get("accuracy") for r in warm),
        "none_accuracy": mean(n.get("accuracy") if n else None for n in none),
    }


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
    measured_quality = [r for r in main if r["greedy_agreement"] is not None and r["mode"] != "none"]
    if measured_quality:
        sections.append(_quality_section(measured_quality))
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
    warnings = tuple(f"{r['workload']}, {r['mode']}: below the quality bar: {'; '.join(r['shortfalls'])}"
                     for r in main if r["shortfalls"])
    return Body(headline=headline, facts=(f"{sequences} request sequences, {len(records)} requests",),
                warnings=warnings, sections=tuple(sections), figures=drawn)


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


def _quality_section(rows: list[dict]) -> Section:
    header = ("workload", "mode", "tier", "speedup", "recomputed tokens", "greedy agreement", "diverged",
              "first divergence", "top-1", "KL", "accuracy (no reuse)", "bar")
    cells = [(r["workload"], r["mode"], r["tier"], ratio(r["speedup"]), num(r["recomputed"], 0),
              num(r["greedy_agreement"], 3), str(r["diverged"]), num(r["first_divergence"], 1), num(r["top1"], 3),
              num(r["kl"], 4), DASH if r["accuracy"] is None else f"{num(r['accuracy'], 2)} ({num(r['none_accuracy'], 2)})",
              DASH if not r["mode"].startswith("chunk") else ("below" if r["shortfalls"] else "meets"))
             for r in rows]
    return Section("Quality against no reuse", tuple(table(header, cells)), intro=(
        "Warm requests, each against no reuse on the same prompt. Greedy agreement: share of identical greedy tokens; "
        "diverged: requests whose output differs, first divergence: the mean index of their first differing token. "
        "Top-1 and KL (nats, mean over positions): teacher-forced over no reuse's greedy output. Accuracy: exact match "
        f"of the document's value in the output. Bar (chunk modes): top-1 >= {BAR.top1_agreement} and accuracy at most "
        f"{BAR.accuracy_drop * 100:.0f} points below no reuse."))


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
    by_key = groups([{**r, "mode": mode_of(r)} for r in records], "workload", "mode", "tier")
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

