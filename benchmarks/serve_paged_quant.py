"""Quantized KV blocks on the paged pool (`EngineConfig(strategy="quantized:bits=...")`, block_size = group_size),
four measurements against paged float blocks:

(a) bytes: one request's KV bytes right after the prefill of a `--bytes-tokens`-token prompt (its blocks out of
    the sink block and the window just quantized), int8 / int4 / float, and per_seq's quantized for reference;
(b) greedy agreement with paged float on the compression-sweep texts (`Corpus.window(prompt, offset=sample)`
    at `--prompt-tokens`, `--samples` each, `--output-tokens` new), and of per_seq's int8 with full KV;
(c) decode speed: `--batch` requests at once in a pool with room for all, each run's median decode-only step
    (configurations alternate over `--rounds`);
(d) concurrency under a KV cap: `--cap-requests` requests of `--cap-prompt` / `--cap-output` tokens all arriving
    at once in `--kv-cache-memory`: peak running requests, output throughput (prefill included), preemptions.
Random prompt tokens for (c) and (d), EOS ignored everywhere. Parts (`--skip`) and (d)'s configurations
(`--configs`) can run in separate invocations (each holding the CPU lock for less time): each adds its
results to `--out`'s results.json. Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_paged_quant.py --out benchmarks/recorded/serve-paged-quant
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
from serve_paged_evict import serve  # this directory is on sys.path when run as a script
from serve_throughput import decode_stats, prompts

from kvbench.bench.environment import describe_host
from kvbench.bench.preflight import parse_bytes
from kvbench.bench.quality import greedy_agreement
from kvbench.bench.records import atomic_write_text
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.tokenizer import for_model

CONFIGS = {"float": None, "int8": "quantized:bits=8", "int4": "quantized:bits=4"}
# Without the sink block (the default keeps 4 sink tokens, so a whole float block): (a) and, asked for, (d)
EXTRA = {"int4_sink0": "quantized:bits=4:sink_tokens=0"}


def kv_bytes(lm, args) -> dict:
    prompt = prompts(1, args.bytes_tokens, lm.config.vocab_size, seed=3)[0]
    fields = {"max_num_batched_tokens": args.bytes_tokens, "num_blocks": args.bytes_tokens // args.block_size + 2}
    results = {}
    for name, strategy in (CONFIGS | EXTRA).items():
        engine = Engine(lm, EngineConfig(strategy=strategy, block_size=args.block_size, **fields))
        engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        engine.step()  # the prefill; the policy quantizes at its end
        usage = engine.kv.pool.usage()
        results[name] = {"bytes_used": usage.bytes_used, "quantized_blocks": usage.quantized,
                         "float_blocks": usage.used}
    for bits in (8, 4):
        engine = Engine(lm, EngineConfig(kv_backend="per_seq", strategy=f"quantized:bits={bits}",
                                         max_num_batched_tokens=args.bytes_tokens))
        engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        engine.step()
        results[f"per_seq_int{bits}"] = {"bytes_used": engine.kv.pool.usage().bytes_used}
    for name in results:
        results[name]["vs_float"] = results[name]["bytes_used"] / results["float"]["bytes_used"]
        print(f"(a) {name}: {results[name]['bytes_used']} bytes, {results[name]['vs_float']:.4f}x float", flush=True)
    return results


def agreement(lm, args) -> dict:
    corpus = Corpus(for_model(lm))
    results = {}
    for length in args.prompt_tokens:
        texts = [corpus.window(length, offset=i) for i in range(args.samples)]
        fields = {"max_num_seqs": args.samples, "max_num_batched_tokens": length}
        runs = {name: serve(lm, texts, args.output_tokens, strategy=strategy, block_size=args.block_size, **fields)[1]
                for name, strategy in CONFIGS.items()}
        runs["per_seq_int8"] = serve(lm, texts, args.output_tokens, kv_backend="per_seq", strategy=CONFIGS["int8"],
                                     **fields)[1]
        pairs = {"int8_vs_float": ("float", "int8"), "int4_vs_float": ("float", "int4"),
                 "per_seq_int8_vs_float": ("float", "per_seq_int8"), "int8_vs_per_seq_int8": ("per_seq_int8", "int8")}
        rows = [{pair: _agree(runs[a][i].output_ids, runs[b][i].output_ids) for pair, (a, b) in pairs.items()}
                for i in range(args.samples)]
        results[length] = {"per_text": rows, **{pair: statistics.fmean(r[pair]["fraction"] for r in rows)
                                                for pair in pairs}}
        print(f"(b) {length} tokens: " + ", ".join(f"{pair} {results[length][pair]:.3f}" for pair in pairs), flush=True)
    return results


def _agree(reference, candidate) -> dict:
    found = greedy_agreement(reference, candidate)
    return {"fraction": found.fraction, "first_divergence": found.first_divergence}


def decode_speed(lm, args) -> dict:
    batch = prompts(args.batch, args.decode_prompt, lm.config.vocab_size)
    runs = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, strategy in CONFIGS.items():
            engine, _, wall = serve(lm, batch, args.output_tokens, strategy=strategy, block_size=args.block_size,
                                    max_num_seqs=args.batch, max_num_batched_tokens=args.decode_prompt,
                                    num_blocks=args.num_blocks)
            steps = decode_stats(engine.step_log)
            runs[name].append({k: steps[k] for k in ("steps", "step_ms_p50", "step_ms_p90", "step_ms_mean", "step_ms")}
                              | {"wall_s": wall})
            print(f"(c) {name}: decode step p50 {steps['step_ms_p50']:.1f} ms", flush=True)
    p50 = {name: statistics.median(r["step_ms_p50"] for r in v) for name, v in runs.items()}
    summary = {"step_ms_p50": p50, **{f"{n}_step_vs_float": p50[n] / p50["float"] for n in CONFIGS if n != "float"}}
    return {"summary": summary, "runs": runs}


def concurrency(lm, args) -> dict:
    batch = prompts(args.cap_requests, args.cap_prompt, lm.config.vocab_size, seed=2)
    results = {}
    for name in args.configs.split(","):
        strategy = (CONFIGS | EXTRA)[name]
        engine, requests, wall = serve(lm, batch, args.cap_output, strategy=strategy, block_size=args.block_size,
                                       max_num_seqs=args.cap_requests, kv_cache_memory=args.kv_cache_memory,
                                       max_num_batched_tokens=args.cap_prompt)
        output = sum(len(r.output_ids) for r in requests)
        steps = engine.step_log
        results[name] = {"peak_running": max(s.num_running for s in steps), "wall_s": wall,
                         "output_tok_s": output / wall, "output_tokens": output,
                         "preemptions": sum(r.preemptions for r in requests), "pool_blocks": engine.kv.pool.num_blocks,
                         "peak_kv_bytes_reserved": max(s.kv_bytes_reserved for s in steps),
                         "peak_kv_bytes_used": max(s.kv_bytes_used for s in steps)}
        print(f"(d) {name}: peak running {results[name]['peak_running']}, "
              f"{results[name]['output_tok_s']:.1f} output tok/s, {results[name]['preemptions']} preemptions", flush=True)
    return results


def vs_float(results: dict) -> dict:
    """(d)'s runs, from any number of invocations, with their ratios to float once float is there."""
    if "float" in results:
        for name in set(results) - {"float"}:
            for key in ("peak_running", "output_tok_s"):
                results[name][f"{key}_vs_float"] = results[name][key] / results["float"][key]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--block-size", type=int, default=64, help="= the strategy's default group_size")
    parser.add_argument("--bytes-tokens", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 2048], help="compression-sweep's")
    parser.add_argument("--samples", type=int, default=2, help="compression-sweep's text slices per point")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode-prompt", type=int, default=512)
    parser.add_argument("--num-blocks", type=int, default=128, help="(c)'s pool: room for every request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=parse_bytes("256MiB"))
    parser.add_argument("--cap-requests", type=int, default=48)
    parser.add_argument("--cap-prompt", type=int, default=512)
    parser.add_argument("--cap-output", type=int, default=128)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"(d)'s configurations: of {', '.join(CONFIGS | EXTRA)}")
    parser.add_argument("--skip", default="", help="comma-separated parts not to run: a, b, c, d")
    parser.add_argument("--out", type=Path, help="a directory for results.json")
    args = parser.parse_args()
    lm = load_model(args.model, device="cpu", dtype="float32")
    serve(lm, prompts(2, 160, lm.config.vocab_size, seed=1), 4, strategy="quantized", block_size=64)  # warm up
    skip = set(filter(None, args.skip.split(",")))
    path = args.out / "results.json" if args.out else None
    record = json.loads(path.read_text()) if path and path.exists() else {"runs": []}
    record["runs"].append({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "args": vars(args) | {"out": str(args.out)}, "host": describe_host(), "torch_threads": torch.get_num_threads()})
    parts = {"a": ("kv_bytes", kv_bytes), "b": ("agreement", agreement), "c": ("decode_speed", decode_speed),
             "d": ("concurrency", concurrency)}
    for part, (key, measure) in parts.items():
        if part in skip:
            continue
        found = measure(lm, args)
        record[key] = vs_float({**record.get(key, {}), **found}) if key == "concurrency" else found
        if path:
            args.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
