"""Continuous batching throughput of `kvbench.serve.Engine`: aggregate decode tokens/s against one at a time.

All requests arrive at once (rate inf), fixed lengths, EOS ignored. For each `max_num_seqs` B, the
engine serves every request and we read its step log: decode tok/s = decode tokens / time of the
steps that ran only decode rows (so prefill does not dilute it), and output tok/s = all output tokens
/ the whole run (prefill included). The baseline is B = 1 through the same engine: before each
batched point, `--sequential` requests run one at a time (the rate per request does not depend on how
many), so the machine's drift (it is shared) spreads over the baseline and the batched points alike;
for each of them `kvbench.engine.generate()` (strategy `dynamic`, batch 1) runs the same prompt right
after, so the engine's single-stream decode speed is compared in alternation too. A few steps slowed
by other processes move the aggregate a lot, so throughput at the median step is reported next to it.
Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_throughput.py --out benchmarks/recorded/serve-throughput
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
from kvbench.engine import GenerationConfig, generate
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams
from kvbench.strategies import build_strategy


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


def engine_config(args, max_num_seqs: int) -> EngineConfig:
    per_request = -(-(args.prompt_tokens + args.output_tokens) // args.block_size)
    return EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        block_size=args.block_size, num_blocks=(max_num_seqs + 1) * per_request)


def decode_stats(steps) -> dict:
    """Throughput of the steps that ran only decode rows: aggregate (tokens / their total time) and at
    the median step (mean rows / median step time, which a few slow steps do not move); the step times
    themselves are kept, so outliers can be seen."""
    decode_only = [s for s in steps if s.prefill_tokens == 0 and s.decode_tokens]
    times = [s.step_ms for s in decode_only]
    rows = statistics.fmean(s.decode_tokens for s in decode_only)
    median = statistics.median(times)
    quantiles = statistics.quantiles(times, n=100, method="inclusive")
    return {"steps": len(times), "decode_tok_s": sum(s.decode_tokens for s in decode_only) / (sum(times) / 1e3),
            "decode_tok_s_at_median_step": rows / (median / 1e3), "mean_rows": rows, "step_ms_mean": statistics.fmean(times),
            "step_ms_p50": median, "step_ms_p90": quantiles[89], "step_ms_p99": quantiles[98], "step_ms_max": max(times),
            "step_ms": [round(t, 1) for t in times]}


def serve(lm, args, max_num_seqs: int, batch: list[list[int]]) -> dict:
    engine = Engine(lm, engine_config(args, max_num_seqs))
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    start = engine.now()
    requests = engine.generate(batch, params)
    wall = engine.now() - start
    steps = engine.step_log
    output = sum(len(r.output_ids) for r in requests)
    return {
        "max_num_seqs": max_num_seqs, "requests": len(batch), "wall_s": wall, "steps": len(steps),
        "output_tokens": output, "output_tok_s": output / wall, **decode_stats(steps),
        "share_ms": {k: sum(getattr(s, k) for s in steps) / sum(s.step_ms for s in steps)
                     for k in ("schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "update_ms")},
        "kv_blocks_used_peak": max(s.blocks_used for s in steps),
        "preemptions": sum(r.preemptions for r in requests),
    }


class OneAtATime:
    """The baseline: B = 1 through the engine, and generate() on the same prompt right after, request by request."""

    def __init__(self, lm, args):
        self.lm, self.engine = lm, Engine(lm, engine_config(args, 1))
        self.config = GenerationConfig(max_new_tokens=args.output_tokens, stop_at_eos=False)
        self.params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
        self.engine_rates: list[float] = []
        self.generate_rates: list[float] = []

    def run(self, batch: list[list[int]]) -> None:
        for prompt in batch:
            (request,) = self.engine.generate([prompt], self.params)
            t = request.timeline
            self.engine_rates.append((len(t.token_s) - 1) / (t.token_s[-1] - t.first_token_s))
            times = generate(self.lm, build_strategy("dynamic"), [prompt], self.config).step_times_s
            self.generate_rates.append((len(times) - 1) / (times[-1] - times[0]))

    def summary(self) -> dict:
        return {"requests": len(self.engine_rates), "engine_decode_tok_s": self.engine_rates,
                "generate_decode_tok_s": self.generate_rates, "engine_median": statistics.median(self.engine_rates),
                "generate_median": statistics.median(self.generate_rates),
                "engine_steps": decode_stats(self.engine.step_log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=3,
                        help="requests run one at a time (the baseline) before each batched point")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", default="8,16,32")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, help="a directory for results.json and report.md")
    args = parser.parse_args()
    lm = load_model(args.model, device="cpu", dtype="float32")
    batch = prompts(args.requests, args.prompt_tokens, lm.config.vocab_size)
    serve(lm, args, 2, prompts(2, 16, lm.config.vocab_size, seed=1))  # warm up
    points = [int(x) for x in args.max_num_seqs.split(",")]
    one = OneAtATime(lm, args)
    rows = []
    for i, b in enumerate(points):
        one.run(batch[i * args.sequential:(i + 1) * args.sequential])
        row = serve(lm, args, b, batch)
        rows.append(row)
        print(f"max_num_seqs {b}: decode {row['decode_tok_s']:.1f} tok/s aggregate, {row['decode_tok_s_at_median_step']:.1f} "
              f"at the median step (p50 {row['step_ms_p50']:.0f} ms, p99 {row['step_ms_p99']:.0f}, max "
              f"{row['step_ms_max']:.0f}); output {row['output_tok_s']:.1f} tok/s over {row['wall_s']:.1f} s; "
              f"preemptions {row['preemptions']}", flush=True)
    single = one.summary()
    base = single["engine_steps"]
    print(f"one at a time ({single['requests']} requests): engine {single['engine_median']:.1f} decode tok/s, "
          f"generate() {single['generate_median']:.1f} (medians of per-request rates); ratio "
          f"{single['engine_median'] / single['generate_median']:.3f}; engine decode steps: {base['decode_tok_s']:.1f} "
          f"tok/s aggregate, {base['decode_tok_s_at_median_step']:.1f} at the median step", flush=True)
    for row in rows:
        row["decode_vs_one_at_a_time"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["median_step_vs_one_at_a_time"] = row["decode_tok_s_at_median_step"] / base["decode_tok_s_at_median_step"]
        print(f"max_num_seqs {row['max_num_seqs']}: {row['decode_vs_one_at_a_time']:.2f}x aggregate, "
              f"{row['median_step_vs_one_at_a_time']:.2f}x at the median step")
    if args.out:
        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "args": vars(args) | {"out": str(args.out)},
                  "host": describe_host(), "torch_threads": torch.get_num_threads(), "single_stream": single, "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / "report.md", report(record))


def report(record: dict) -> str:
    single, base = record["single_stream"], record["single_stream"]["engine_steps"]
    lines = [f"# serve throughput ({record['date']})", "", f"`{record['command']}`", "",
             f"One at a time ({single['requests']} requests; medians of per-request decode rates): engine "
             f"{single['engine_median']:.1f} tok/s, `generate()` {single['generate_median']:.1f}: ratio "
             f"**{single['engine_median'] / single['generate_median']:.3f}**. The engine's one-at-a-time decode steps: "
             f"{base['decode_tok_s']:.1f} tok/s aggregate, {base['decode_tok_s_at_median_step']:.1f} at the median step "
             f"(p50 {base['step_ms_p50']:.1f} ms, p99 {base['step_ms_p99']:.1f}, max {base['step_ms_max']:.1f}).", "",
             "Decode tok/s counts the steps that ran only decode rows: aggregate = their tokens / their time; at the "
             "median step = mean rows / median step time.", "",
             "| max_num_seqs | requests | decode tok/s aggregate | vs one at a time | at the median step | vs one at a time "
             "| step ms p50 / p99 / max | output tok/s (prefill incl.) | wall s | schedule+prepare share | preemptions |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        overhead = r["share_ms"]["schedule_ms"] + r["share_ms"]["prepare_ms"]
        lines.append(f"| {r['max_num_seqs']} | {r['requests']} | {r['decode_tok_s']:.1f} | {r['decode_vs_one_at_a_time']:.2f}x "
                     f"| {r['decode_tok_s_at_median_step']:.1f} | {r['median_step_vs_one_at_a_time']:.2f}x "
                     f"| {r['step_ms_p50']:.0f} / {r['step_ms_p99']:.0f} / {r['step_ms_max']:.0f} | {r['output_tok_s']:.1f} "
                     f"| {r['wall_s']:.1f} | {overhead:.1%} | {r['preemptions']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
