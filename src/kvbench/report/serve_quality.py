"""A serve run's engines against its reference engine on the same requests, and the engine to pick per
(request rate, KV cap).

Each point is paired with the reference engine's point at the same rate and `engine_axes` values (label
`reference,field=value@rate`); records pair by schedule index and trial (the reference's first trial when it
ran fewer). Requests are the same only when their prompts are: a point whose prompt digests differ from its
reference's is not compared. Greedy agreement and first divergence are `kvbench.bench.quality`'s.
"""

from __future__ import annotations

import math

from kvbench.bench.metrics import summarize
from kvbench.bench.quality import greedy_agreement
from kvbench.report.document import Section
from kvbench.report.tables import num, table

QUALITY_BAR = 0.9  # mean greedy agreement with the reference that a recommended engine keeps


def reference_key(point: dict, reference: str) -> str:
    """The reference engine's point beside `point`: same axis values (the label's suffix), same rate."""
    suffix = point["engine"][len(point["method"] or point["engine"]):]
    return f"{reference}{suffix}@{point['request_rate']}"


def against_reference(records: dict[str, list[dict]], fields: dict[str, dict], reference: str) -> dict[str, dict]:
    """Per point key: output length and its change against the reference, greedy agreement (mean fraction of
    the reference's tokens matched position by position) and mean first divergence (over requests that
    diverged); `comparable` False where the reference is missing or the prompts differ."""
    out = {}
    for key, rs in records.items():
        ok = [r for r in rs if r.get("status", "ok") == "ok" and r.get("output_ids") is not None]
        ref_records = [r for r in records.get(reference_key(fields[key], reference), ())
                       if r.get("status", "ok") == "ok" and r.get("output_ids") is not None]
        by_trial = {(r["trial"], r["index"]): r for r in ref_records}
        first = {}
        for r in sorted(ref_records, key=lambda r: r["trial"]):
            first.setdefault(r["index"], r)
        pairs = [(by_trial.get((r["trial"], r["index"])) or first.get(r["index"]), r) for r in ok]
        pairs = [(ref, r) for ref, r in pairs if ref is not None and ref["output_ids"]]
        length = summarize(r["output_tokens"] for r in ok).mean
        if not pairs or any(ref.get("prompt_digest") != r.get("prompt_digest") for ref, r in pairs):
            out[key] = {"comparable": False, "output_tokens.mean": length}
            continue
        agreements = [greedy_agreement(ref["output_ids"], r["output_ids"]) for ref, r in pairs]
        ref_length = summarize(ref["output_tokens"] for ref, _ in pairs).mean
        diverged = [a.first_divergence for a in agreements if a.first_divergence is not None]
        out[key] = {"comparable": True, "pairs": len(pairs), "output_tokens.mean": length,
                    "output_length_change": length / ref_length - 1 if ref_length else None,
                    "greedy_agreement": summarize(a.fraction for a in agreements).mean,
                    "diverged": len(diverged), "first_divergence.mean": summarize(diverged).mean}
    return out


def quality_section(points: dict[str, dict], reference: str, eos_honoured: bool) -> Section:
    header = ("point", "budget", "out tokens mean", "length vs reference", "greedy agreement", "diverged / pairs",
              "first divergence mean", "task accuracy (reference)", "bytes moved / out token KiB")
    rows = []
    for key, p in points.items():
        kib = p.get("bytes_moved_per_token")
        kib = None if kib is None else kib / 1024
        ref = points.get(reference_key(p, reference), {})
        accuracy = "" if not _finite(p.get("accuracy")) else f"{num(p['accuracy'], 2)} ({num(ref.get('accuracy'), 2)})"
        if not p.get("comparable"):
            rows.append((key, num(p.get("budget"), 2), num(p.get("output_tokens.mean"), 1), "prompts differ or no "
                         "reference", "", "", "", accuracy, num(kib, 1)))
            continue
        change = p["output_length_change"]
        rows.append((key, num(p.get("budget"), 2), num(p["output_tokens.mean"], 1),
                     "" if change is None else f"{change:+.1%}", num(p["greedy_agreement"], 3),
                     f"{p['diverged']} / {p['pairs']}", num(p["first_divergence.mean"], 1), accuracy, num(kib, 1)))
    length = ("EOS is honoured, so each output ends where its engine's model stops: the length change is a "
              "measurement" if eos_honoured else "EOS is ignored (every output runs to max_tokens), so lengths "
              "do not change; run with ignore_eos: false to measure it")
    return Section(f"Against the reference engine `{reference}`", tuple(table(header, rows)), intro=(
        f"Each point's requests against the same requests (same prompt digests, same rate and KV cap) served by "
        f"`{reference}`. {length}. Greedy agreement: the share of the reference's output tokens matched position "
        "by position (an output that stops early mismatches the rest), averaged over requests; first divergence: "
        "the index of the first differing token, averaged over the requests that diverged. Task accuracy (where the "
        "workload knows its answers, as needle does): the share of outputs that contain every answer, with the "
        "reference's in brackets. Bytes moved: keys and "
        "values brought from the offload side to the compute device (offloaded: the stored KV of every layer at "
        "each step; speculative_fetch: the fetched tokens) per output token. On a CPU these are host-to-host "
        "copies: the bytes are exact, and the time they would save needs a GPU."))


def choice_section(points: dict[str, dict], reference: str, slo: dict | None) -> Section:
    """Per (rate, KV cap): the engine with the best goodput among those whose agreement stays at the bar."""
    measure = "goodput" if slo else "request_throughput"
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for key, p in points.items():
        groups.setdefault((p["request_rate"], p.get("kv_cache_memory")), []).append((key, p))
    header = ("request rate", "KV cap MiB", "best engine", f"{measure.replace('_', ' ')} req/s", "greedy agreement",
              "out tok/s", "peak running", "excluded by quality (agreement)")
    rows = []
    for (rate, cap), members in groups.items():
        good = [(k, p) for k, p in members if p.get("comparable") and (p.get("greedy_agreement") or 0) >= QUALITY_BAR]
        chosen = {k for k, _ in good}
        bad = [(k, p) for k, p in members if k not in chosen]
        best = max(good, key=lambda kp: kp[1].get(measure) or 0, default=None)
        excluded = "; ".join(f"{p['engine']} ({_agreement(p)})" for _, p in bad) or "none"
        if best is None:
            rows.append((str(rate), num(None if cap is None else cap / 2**20, 0), "none at the bar", "", "", "", "",
                         excluded))
            continue
        p = best[1]
        rows.append((str(rate), num(None if cap is None else cap / 2**20, 0), f"`{p['engine']}`",
                     num(p.get(measure), 2), num(p["greedy_agreement"], 3), num(p["output_throughput"], 1),
                     num(p["peak_running"], 1), excluded))
    basis = (f"goodput under the SLO {slo}" if slo else "request throughput (no SLO given, so every completed "
             "request counts)")
    return Section("Which engine for my workload and budget", tuple(table(header, rows)), intro=(
        f"For each request rate and KV cap, the engine with the best {basis} among those whose mean greedy agreement "
        f"with `{reference}` is at least {QUALITY_BAR}; engines below that bar, or not comparable, are named with "
        "their agreement. One workload and one model: the choice holds for this workload's prompt and output "
        "lengths, not in general."))


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _agreement(point: dict) -> str:
    return num(point.get("greedy_agreement"), 2) if point.get("comparable") else "not compared"
