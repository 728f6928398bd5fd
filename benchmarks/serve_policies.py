"""Scheduling policies of `kvbench.serve.Engine` on one workload each, all requests arriving at once, EOS ignored.

- `preemption`: fixed lengths under a pool for about `--pool-requests` full requests: optimistic admission
  with recompute preemption, with swap preemption (an unlimited host tier), and reserve admission.
  Reports throughput, preemptions, tokens computed again (prefill tokens beyond each prompt once) and
  bytes swapped. On a CPU the swap is a host-to-host copy: its bytes are exact, its time (inside
  schedule_ms) is not what a GPU's PCIe transfer would cost.
- `batching`: output lengths drawn from U[min, max] (seeded): continuous vs static batching at one
  `max_num_seqs`. Static here has no padding compute (finished rows leave the forward), so it is
  slightly flattered against real padded static batches.
Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_policies.py preemption --out benchmarks/recorded/serve-preemption
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_policies.py batching --out benchmarks/recorded/serve-batching
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import statistics
import sys
from pathlib import Path

import torch

from kvbench.bench.environment import describe_host
from kvbench.bench.records import atomic_write_text
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams

POLICIES = {
    "preemption": {"recompute": dict(admission="optimistic", preemption="recompute"),
                   "swap": dict(admission="optimistic", preemption="swap"),
                   "reserve": dict(admission="reserve")},
    "batching": {"continuous": dict(batching="continuous"), "static": dict(batching="static")},
}


def workload(args, vocab: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) per request; the lengths are drawn first, so they do not depend on the vocabulary."""
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_output, args.output_tokens) if args.experiment == "batching" else args.output_tokens
               for _ in range(args.requests)]
    return [([rng.randrange(vocab) for _ in range(args.prompt_tokens)], n) for n in lengths]


def serve(lm, config: EngineConfig, requests: list[tuple[list[int], int]]) -> dict:
    engine = Engine(lm, config)
    start = engine.now()
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True), arrival_s=start) for p, n in requests]
    engine.run_until_idle()
    wall = engine.now() - start
    done = [engine.requests[i] for i in ids]
    steps = engine.step_log
    output = sum(len(r.output_ids) for r in done)
    p50 = statistics.median(s.step_ms for s in steps)
    return {
        "wall_s": wall, "steps": len(steps), "output_tokens": output, "output_tok_s": output / wall,
        "request_throughput": len(done) / wall, "step_ms_p50": p50,
        "request_throughput_at_median_step": len(done) / (len(steps) * p50 / 1e3),
        "peak_running": max(s.num_running for s in steps),
        "mean_running": sum(s.num_running for s in steps) / len(steps),
        "preemptions": sum(r.preemptions for r in done), "swaps": sum(r.swaps for r in done),
        "recomputed_tokens": sum(s.prefill_tokens for s in steps) - sum(len(p) for p, _ in requests),
        "bytes_swapped": sum(s.bytes_swapped for s in steps),
        "schedule_ms_share": sum(s.schedule_ms for s in steps) / sum(s.step_ms for s in steps),
        "kv_blocks": engine.kv.pool.num_blocks, "kv_bytes_reserved_peak": max(s.kv_bytes_reserved for s in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(POLICIES))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--output-tokens", type=int, help="the output length (preemption) or its maximum (batching)")
    parser.add_argument("--min-output", type=int, default=16, help="batching: the shortest drawn output")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--pool-requests", type=int, default=6, help="preemption: the pool holds this many full requests")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="a directory for results.json and report.md")
    args = parser.parse_args()
    defaults = {"preemption": (16, 256, 256, 16), "batching": (64, 128, 256, 8)}[args.experiment]
    for name, value in zip(("requests", "prompt_tokens", "output_tokens", "max_num_seqs"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    lm = load_model(args.model, device="cpu", dtype="float32")
    per_request = -(-(args.prompt_tokens + args.output_tokens) // args.block_size)
    pool = per_request * (args.pool_requests if args.experiment == "preemption" else args.max_num_seqs + 1)
    requests = workload(args, lm.config.vocab_size)
    base = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, num_blocks=pool)
    serve(lm, EngineConfig(**base), [(p[:16], 4) for p, _ in requests[:2]])  # warm up
    rows = []
    for name, policy in POLICIES[args.experiment].items():
        row = {"policy": name, **serve(lm, EngineConfig(**base, **policy), requests)}
        rows.append(row)
        print(f"{name}: {row['output_tok_s']:.1f} output tok/s, {row['request_throughput']:.3f} req/s over "
              f"{row['wall_s']:.1f} s; peak running {row['peak_running']}; preemptions {row['preemptions']} "
              f"(swaps {row['swaps']}); recomputed tokens {row['recomputed_tokens']}; bytes swapped "
              f"{row['bytes_swapped']}", flush=True)
    first = rows[0]
    for row in rows:
        row["request_throughput_vs_first"] = row["request_throughput"] / first["request_throughput"]
        row["at_median_step_vs_first"] = (row["request_throughput_at_median_step"]
                                          / first["request_throughput_at_median_step"])
    if args.out:
        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
                  "args": vars(args) | {"out": str(args.out)}, "host": describe_host(),
                  "torch_threads": torch.get_num_threads(), "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / "report.md", report(record))


def report(record: dict) -> str:
    a = record["args"]
    lines = [f"# serve {a['experiment']} policies ({record['date']})", "", f"`{record['command']}`", "",
             f"{a['requests']} requests of {a['prompt_tokens']} prompt tokens, output "
             + (f"U[{a['min_output']}, {a['output_tokens']}]" if a["experiment"] == "batching" else str(a["output_tokens"]))
             + f" tokens (EOS ignored), all at once; max_num_seqs {a['max_num_seqs']}, block size {a['block_size']}, "
             f"{record['rows'][0]['kv_blocks']} KV blocks. Swap on a CPU is host-to-host: bytes exact, time not "
             "representative. Static batching has no padding compute here (flattered slightly). The machine is "
             "shared: steps slowed by other processes move wall-clock numbers a lot, so req/s at the median step "
             "(requests / (steps x median step time)) is given beside them.", "",
             "| policy | output tok/s | req/s | vs first | steps | median step ms | req/s at median step | vs first "
             "| wall s | peak / mean running | preemptions (swaps) | recomputed tokens | bytes swapped | schedule share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['policy']} | {r['output_tok_s']:.1f} | {r['request_throughput']:.3f} "
                     f"| {r['request_throughput_vs_first']:.2f}x | {r['steps']} | {r['step_ms_p50']:.0f} "
                     f"| {r['request_throughput_at_median_step']:.3f} | {r['at_median_step_vs_first']:.2f}x "
                     f"| {r['wall_s']:.1f} | {r['peak_running']} / "
                     f"{r['mean_running']:.1f} | {r['preemptions']} ({r['swaps']}) | {r['recomputed_tokens']} "
                     f"| {r['bytes_swapped']} | {r['schedule_ms_share']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
