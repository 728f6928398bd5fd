"""The per_seq backend's cost: N requests all at once through `Engine(kv_backend="per_seq")` against the
paged backend and against one at a time (`generate()`, batch 1, request after request).

per_seq runs one forward per scheduled request (continuous scheduling, no batched compute), so a decode
step of B requests costs about B single-stream steps; the paged backend runs them in one packed forward.
Rounds alternate the three so the shared machine's drift spreads over all of them. Output tok/s = output
tokens / wall time (prefill included); decode tok/s and step times come from the decode-only steps.
Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_per_seq.py --out benchmarks/recorded/serve-per-seq
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from serve_throughput import decode_stats, prompts  # this directory is on sys.path when run as a script

from kvbench.bench.environment import describe_host
from kvbench.bench.records import atomic_write_text
from kvbench.bench.suite import parse_strategy
from kvbench.device import clock
from kvbench.engine import GenerationConfig, generate
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams


def serve(lm, args, batch, **fields) -> dict:
    engine = Engine(lm, EngineConfig(max_num_seqs=len(batch), max_num_batched_tokens=args.max_num_batched_tokens,
                                     **fields))
    start = engine.now()
    requests = engine.generate(batch, SamplingParams(max_tokens=args.output_tokens, ignore_eos=True))
    wall = engine.now() - start
    steps = decode_stats(engine.step_log)
    steps.pop("step_ms")
    return {"wall_s": wall, "output_tok_s": sum(len(r.output_ids) for r in requests) / wall,
            "peak_running": max(s.num_running for s in engine.step_log),
            "kv_bytes_used_peak": max(s.kv_bytes_used for s in engine.step_log), **steps,
            "tokens": [r.output_ids for r in requests]}


def one_at_a_time(lm, args, batch, strategy: str) -> dict:
    config = GenerationConfig(max_new_tokens=args.output_tokens, stop_at_eos=False)
    start = clock(lm.device)
    results = [generate(lm, parse_strategy(strategy).build(), [p], config) for p in batch]
    wall = clock(lm.device) - start
    rates = [(len(r.step_times_s) - 1) / (r.step_times_s[-1] - r.step_times_s[0]) for r in results]
    return {"wall_s": wall, "output_tok_s": sum(len(r.tokens[0]) for r in results) / wall,
            "decode_tok_s_median_request": statistics.median(rates), "tokens": [r.tokens[0] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--strategy", default="dynamic", help="per_seq's strategy (and one at a time's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="a directory for results.json")
    args = parser.parse_args()
    lm = load_model(args.model, device="cpu", dtype="float32")
    batch = prompts(args.requests, args.prompt_tokens, lm.config.vocab_size)
    serve(lm, args, prompts(2, 16, lm.config.vocab_size, seed=1))  # warm up
    runs = {"one_at_a_time": [], "paged": [], "per_seq": []}
    for round_ in range(args.rounds):
        runs["one_at_a_time"].append(one_at_a_time(lm, args, batch, args.strategy))
        runs["paged"].append(serve(lm, args, batch))
        runs["per_seq"].append(serve(lm, args, batch, kv_backend="per_seq", strategy=args.strategy))
        print(f"round {round_}: " + "; ".join(f"{k} {v[-1]['output_tok_s']:.1f} output tok/s" for k, v in runs.items()),
              flush=True)
    summary = {k: statistics.fmean(r["output_tok_s"] for r in v) for k, v in runs.items()}
    summary["per_seq_vs_one_at_a_time"] = summary["per_seq"] / summary["one_at_a_time"]
    summary["per_seq_vs_paged"] = summary["per_seq"] / summary["paged"]
    summary["decode_step_ms_p50"] = {k: statistics.fmean(r["step_ms_p50"] for r in runs[k]) for k in ("paged", "per_seq")}
    reference = runs["one_at_a_time"][0]["tokens"]
    summary["tokens_equal_one_at_a_time"] = {k: [r["tokens"] == reference for r in runs[k]] for k in ("paged", "per_seq")}
    print(json.dumps(summary, indent=1))
    if args.out:
        for v in runs.values():
            for r in v:
                r.pop("tokens")
        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
                  "args": vars(args) | {"out": str(args.out)}, "host": describe_host(),
                  "torch_threads": torch.get_num_threads(), "summary": summary, "runs": runs}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.json", json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
