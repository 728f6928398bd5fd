"""Offload and speculative fetch native to the paged pool (`kvbench.serve.fetch`), on the same requests:

(a) paged full KV, paged `offloaded` and paged `speculative_fetch` at each `--budgets`, `--requests` prose
    slices of the offline corpus of `--prompt-tokens` tokens all arriving at once (rate inf), `--output-tokens`
    each, EOS ignored: KV bytes moved to the compute device per output token (exact, from the requests'
    `bytes_moved`), the median decode-only step against full KV's (configurations alternate over `--rounds`,
    so drift spreads over all), and greedy agreement with full KV per request;
(b) paged speculative_fetch against the per_seq strategy on `--texts` of the same requests at `--agreement-budget`
    (per_seq runs them one at a time; paged one at a time too, so both compute the same keys and queries).
On a CPU the host tier is the same memory: bytes are exact, times are not a transfer's. Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_paged_fetch.py --out benchmarks/recorded/serve-paged-fetch
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from serve_paged_evict import _agree, serve  # this directory is on sys.path when run as a script
from serve_throughput import decode_stats

from kvbench.bench.environment import describe_host
from kvbench.bench.records import atomic_write_text
from kvbench.models import load_model
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.tokenizer import for_model


def moved_per_token(requests) -> float:
    return sum(r.bytes_moved for r in requests) / sum(len(r.output_ids) for r in requests)


def fetch_study(lm, texts, args) -> dict:
    configs = {"full": None, "offloaded": "offloaded",
               **{f"fetch_{b}": f"speculative_fetch:budget={b}" for b in args.budgets}}
    fields = {"max_num_seqs": len(texts), "max_num_batched_tokens": args.prompt_tokens, "num_blocks": args.num_blocks}
    runs, outputs, moved = {name: [] for name in configs}, {}, {}
    for _ in range(args.rounds):
        for name, strategy in configs.items():
            engine, requests, wall = serve(lm, texts, args.output_tokens, strategy=strategy, **fields)
            steps = decode_stats(engine.step_log)
            runs[name].append({k: steps[k] for k in ("steps", "step_ms_p50", "step_ms_p90", "step_ms_mean")}
                              | {"wall_s": wall})
            ids = [r.output_ids for r in requests]
            assert outputs.setdefault(name, ids) == ids, f"{name}: greedy outputs changed between rounds"
            if strategy is not None:
                bytes_per_token = moved_per_token(requests)
                assert moved.setdefault(name, bytes_per_token) == bytes_per_token, f"{name}: bytes changed"
            print(f"(a) {name}: decode step p50 {steps['step_ms_p50']:.1f} ms"
                  + (f", {moved[name] / 2**20:.2f} MiB moved per output token" if name in moved else ""), flush=True)
    p50 = {name: statistics.median(r["step_ms_p50"] for r in v) for name, v in runs.items()}
    summary = {"step_ms_p50": p50, "step_vs_full": {n: p50[n] / p50["full"] for n in configs if n != "full"},
               "bytes_moved_per_token": moved,
               "bytes_vs_offloaded": {n: moved[n] / moved["offloaded"] for n in moved if n != "offloaded"},
               "greedy_agreement_vs_full": {n: statistics.fmean(_agree(outputs["full"][i], ids)["fraction"]
                                                                for i, ids in enumerate(outputs[n]))
                                            for n in configs if n != "full"}}
    for name in moved:
        print(f"(a) {name}: {summary['bytes_vs_offloaded'].get(name, 1.0):.3f}x offloaded's bytes per token, "
              f"decode step time {summary['step_vs_full'][name]:.2f}x full KV's, agreement "
              f"{summary['greedy_agreement_vs_full'][name]:.3f}", flush=True)
    return {"summary": summary, "runs": runs}


def per_seq_agreement(lm, texts, args) -> dict:
    strategy = f"speculative_fetch:budget={args.agreement_budget}"
    fields = {"max_num_seqs": 1, "max_num_batched_tokens": args.prompt_tokens}
    _, paged, _ = serve(lm, texts, args.output_tokens, strategy=strategy, num_blocks=args.num_blocks, **fields)
    _, per_seq, _ = serve(lm, texts, args.output_tokens, strategy=strategy, kv_backend="per_seq", **fields)
    rows = [_agree(s.output_ids, p.output_ids) for p, s in zip(paged, per_seq)]
    result = {"strategy": strategy, "per_text": rows, "paged_vs_per_seq": statistics.fmean(r["fraction"] for r in rows),
              "paged_bytes": [r.bytes_moved for r in paged], "per_seq_bytes": [r.bytes_moved for r in per_seq]}
    print(f"(b) {strategy}: paged vs per_seq greedy agreement {result['paged_vs_per_seq']:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--budgets", type=lambda s: [float(b) for b in s.split(",")], default=[0.5, 0.25])
    parser.add_argument("--num-blocks", type=int, default=1024, help="the pool: room for every request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--agreement-budget", type=float, default=0.25)
    parser.add_argument("--skip", default="", help="comma-separated parts not to run: a, b")
    parser.add_argument("--out", type=Path, help="a directory for results.json")
    args = parser.parse_args()
    lm = load_model(args.model, device="cpu", dtype="float32")
    corpus = Corpus(for_model(lm))
    texts = [corpus.window(args.prompt_tokens, offset=i) for i in range(args.requests)]
    serve(lm, texts[:2], 4, strategy="speculative_fetch", max_num_batched_tokens=args.prompt_tokens)  # warm up
    skip = set(filter(None, args.skip.split(",")))
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "args": vars(args) | {"out": str(args.out)}, "host": describe_host(),
              "torch_threads": torch.get_num_threads(),
              "note": "CPU: the host tier and the compute device are the same memory; bytes are exact, times are "
                      "not a transfer's"}
    for part, name, measure in (("a", "fetch", fetch_study), ("b", "per_seq_agreement", per_seq_agreement)):
        if part not in skip:
            record[name] = measure(lm, texts[:args.texts] if part == "b" else texts, args)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.out / "results.json", json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
