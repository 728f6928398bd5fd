"""Eviction native to the paged pool (`EngineConfig(strategy=...)` on `kv_backend: paged`), three measurements:

(a) decode speed: paged h2o at budget 1.0 and 0.5 against paged full KV, `--batch` requests at once; each
    run's median decode-only step (configurations alternate over `--rounds`, so drift spreads over all);
(b) concurrency under a KV cap: `--cap-requests` requests of `--cap-prompt` / `--cap-output` tokens all
    arriving at once in `--kv-cache-memory`, full KV against sink / h2o / snapkv at `--cap-budget`: peak
    running requests, output throughput (output tokens / wall time, prefill included), preemptions;
(c) greedy agreement of each paged policy with the same strategy on `per_seq` (and of both with full KV)
    on `--texts` prose slices of the offline corpus.
Random prompt tokens for (a) and (b), EOS ignored everywhere. Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_paged_evict.py --out benchmarks/recorded/serve-paged-evict
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
from serve_throughput import decode_stats, prompts  # this directory is on sys.path when run as a script

from kvbench.bench.environment import describe_host
from kvbench.bench.quality import greedy_agreement
from kvbench.bench.records import atomic_write_text
from kvbench.bench.preflight import parse_bytes
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.tokenizer import for_model


def serve(lm, batch, output_tokens, **fields) -> tuple[Engine, list, float]:
    engine = Engine(lm, EngineConfig(**fields))
    start = engine.now()
    requests = engine.generate(batch, SamplingParams(max_tokens=output_tokens, ignore_eos=True))
    return engine, requests, engine.now() - start


def decode_speed(lm, args) -> dict:
    batch = prompts(args.batch, args.prompt_tokens, lm.config.vocab_size)
    configs = {"full": None, "h2o_1.0": "h2o:budget=1.0", "h2o_0.5": "h2o:budget=0.5"}
    runs = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, strategy in configs.items():
            engine, requests, wall = serve(lm, batch, args.output_tokens, strategy=strategy, max_num_seqs=args.batch,
                                           max_num_batched_tokens=args.prompt_tokens, num_blocks=args.num_blocks)
            steps = decode_stats(engine.step_log)
            runs[name].append({k: steps[k] for k in ("steps", "step_ms_p50", "step_ms_p90", "step_ms_mean", "step_ms")}
                              | {"wall_s": wall, "evicted": sum(r.num_evicted for r in requests),
                                 "peak_blocks_used": max(s.blocks_used for s in engine.step_log)})
            print(f"(a) {name}: decode step p50 {steps['step_ms_p50']:.1f} ms", flush=True)
    p50 = {name: statistics.median(r["step_ms_p50"] for r in v) for name, v in runs.items()}
    summary = {"step_ms_p50": p50, **{f"{n}_speed_vs_full": p50["full"] / p50[n] for n in configs if n != "full"}}
    return {"summary": summary, "runs": runs}


def concurrency(lm, args) -> dict:
    batch = prompts(args.cap_requests, args.cap_prompt, lm.config.vocab_size, seed=2)
    results = {}
    for name in ("full", "sink", "h2o", "snapkv"):
        strategy = None if name == "full" else f"{name}:budget={args.cap_budget}"
        engine, requests, wall = serve(lm, batch, args.cap_output, strategy=strategy, max_num_seqs=args.cap_requests,
                                       kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.cap_prompt)
        output = sum(len(r.output_ids) for r in requests)
        results[name] = {"peak_running": max(s.num_running for s in engine.step_log), "wall_s": wall,
                         "output_tok_s": output / wall, "output_tokens": output,
                         "preemptions": sum(r.preemptions for r in requests),
                         "evicted": sum(r.num_evicted for r in requests), "pool_blocks": engine.kv.pool.num_blocks,
                         "peak_blocks_used": max(s.blocks_used for s in engine.step_log),
                         "peak_kv_bytes_used": max(s.kv_bytes_used for s in engine.step_log)}
        print(f"(b) {name}: peak running {results[name]['peak_running']}, "
              f"{results[name]['output_tok_s']:.1f} output tok/s", flush=True)
    for name in ("sink", "h2o", "snapkv"):
        results[name]["peak_running_vs_full"] = results[name]["peak_running"] / results["full"]["peak_running"]
        results[name]["output_tok_s_vs_full"] = results[name]["output_tok_s"] / results["full"]["output_tok_s"]
    return results


def agreement(lm, args) -> dict:
    corpus = Corpus(for_model(lm))
    texts = [corpus.window(args.prompt_tokens, offset=i) for i in range(args.texts)]
    fields = {"max_num_seqs": args.texts, "max_num_batched_tokens": args.prompt_tokens}
    _, full, _ = serve(lm, texts, args.output_tokens, **fields)
    reference = [r.output_ids for r in full]
    results = {}
    for name in ("sink", "h2o", "snapkv"):
        strategy = f"{name}:budget={args.agreement_budget}"
        _, paged, _ = serve(lm, texts, args.output_tokens, strategy=strategy, **fields)
        _, per_seq, _ = serve(lm, texts, args.output_tokens, strategy=strategy, kv_backend="per_seq", **fields)
        rows = []
        for ref, p, s in zip(reference, paged, per_seq):
            rows.append({pair: _agree(a, b) for pair, (a, b) in {
                "paged_vs_per_seq": (s.output_ids, p.output_ids), "paged_vs_full": (ref, p.output_ids),
                "per_seq_vs_full": (ref, s.output_ids)}.items()})
        results[strategy] = {"per_text": rows, **{pair: statistics.fmean(r[pair]["fraction"] for r in rows)
                                                  for pair in rows[0]}}
        print(f"(c) {strategy}: " + ", ".join(f"{pair} {results[strategy][pair]:.3f}" for pair in rows[0]), flush=True)
    return results


def _agree(reference, candidate) -> dict:
    found = greedy_agreement(reference, candidate)
    return {"fraction": found.fraction, "first_divergence": found.first_divergence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=512, help="(a)'s pool: room for every request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=parse_bytes("256MiB"))
    parser.add_argument("--cap-requests", type=int, default=32)
    parser.add_argument("--cap-prompt", type=int, default=512)
    parser.add_argument("--cap-output", type=int, default=256)
    parser.add_argument("--cap-budget", type=float, default=0.25)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--agreement-budget", type=float, default=0.5)
    parser.add_argument("--skip", default="", help="comma-separated parts not to run: a, b, c")
    parser.add_argument("--out", type=Path, help="a directory for results.json")
    args = parser.parse_args()
    lm = load_model(args.model, device="cpu", dtype="float32")
    serve(lm, prompts(2, 96, lm.config.vocab_size, seed=1), 4, strategy="h2o")  # warm up
    skip = set(filter(None, args.skip.split(",")))
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "args": vars(args) | {"out": str(args.out)}, "host": describe_host(),
              "torch_threads": torch.get_num_threads()}
    for part, measure in (("a", decode_speed), ("b", concurrency), ("c", agreement)):
        if part not in skip:
            record[{"a": "decode_speed", "b": "concurrency", "c": "agreement"}[part]] = measure(lm, args)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.out / "results.json", json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
