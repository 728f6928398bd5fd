"""kvbench's serving engine against transformers' own continuous batching, on the same requests.

N requests (default 16 of 512 seeded random prompt ids / 128 output tokens, greedy, EOS ignored) are
submitted at once to (1) `kvbench.serve.Engine` (paged KV, `max_num_seqs` 16, `max_num_batched_tokens`
512, blocks of 16 tokens) and (2) transformers' `ContinuousBatchingManager`, the engine behind
`model.generate_batch`, set up the same way: a page of 16 tokens, the same number of pages, at most 16
requests and 512 tokens per forward, its FIFO scheduler (decode rows first, then prompt chunks, as
kvbench's FCFS scheduler does), prefix sharing on in both (random prompts: no hits), and a free-block
margin equal to kvbench's admission watermark. Both run the same model object (fp32, transformers'
`sdpa`, which kvbench swaps for its own attention during its forwards only) in the same process, and
each engine's loop runs in a worker thread while the main thread waits, as transformers' manager and
`kvbench serve` run theirs (`--kvbench-thread main` runs kvbench's in the main thread instead: on this
machine a loaded CPU slowed main-thread forwards far more than worker-thread ones).

Throughput = generated tokens / (last token's time - submission), each engine's own per-token clock
(`time.perf_counter` in both); engine set-up (pool allocation, manager warm-up) is outside the clock.
The two take turns trial by trial (kvbench first in even trials), so the machine's drift spreads over
both. Batched fp32 can flip near-tied tokens, so each request's outputs are compared: equal, or the
index of the first divergence. Record under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_vs_hf_cb.py --out benchmarks/recorded/serve-vs-hf-cb
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from kvbench.bench.environment import describe
from kvbench.bench.records import atomic_write_text
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams
from kvbench.workloads.synthetic import synthetic_ids


@dataclass(frozen=True)
class Shape:
    requests: int = 16
    prompt_tokens: int = 512
    output_tokens: int = 128
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    block_size: int = 16

    @property
    def num_blocks(self) -> int:
        """Room for every running request at full length plus one spare, in both engines: no preemption."""
        return (self.max_num_seqs + 1) * -(-(self.prompt_tokens + self.output_tokens) // self.block_size)


@dataclass(frozen=True)
class Run:
    """One engine's pass over the requests: outputs in prompt order, perf_counter seconds."""

    engine: str
    submitted_s: float
    outputs: list[list[int]]
    first_token_s: list[float]
    last_token_s: list[float]

    def summary(self) -> dict:
        wall = max(self.last_token_s) - self.submitted_s
        tokens = sum(len(o) for o in self.outputs)
        ttft = [t - self.submitted_s for t in self.first_token_s]
        return {"engine": self.engine, "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
                "ttft_s_median": statistics.median(ttft), "ttft_s_max": max(ttft)}


def build_prompts(vocab_size: int, shape: Shape) -> list[list[int]]:
    """The one request list both engines receive: seeded random ids, one seed per request."""
    return [synthetic_ids(vocab_size, shape.prompt_tokens, seed=i) for i in range(shape.requests)]


def engine_config(shape: Shape) -> EngineConfig:
    return EngineConfig(max_num_seqs=shape.max_num_seqs, max_num_batched_tokens=shape.max_num_batched_tokens,
                        block_size=shape.block_size, num_blocks=shape.num_blocks)


def hf_config(shape: Shape) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(page_size=shape.block_size, num_blocks=shape.num_blocks,
                                    max_batch_tokens=shape.max_num_batched_tokens,
                                    max_requests_per_batch=shape.max_num_seqs, scheduler_type="fifo",
                                    allow_block_sharing=True, safety_margin=engine_config(shape).watermark)


def run_kvbench(lm, prompts: list[list[int]], shape: Shape, thread: str = "worker") -> Run:
    """kvbench's engine, its loop in a worker thread (as transformers' manager and `kvbench serve` run
    theirs) or, with thread="main", in the calling thread."""
    engine = Engine(lm, engine_config(shape))

    def serve():
        submitted = engine.now()
        return submitted, engine.generate(prompts, SamplingParams(max_tokens=shape.output_tokens, ignore_eos=True))

    if thread == "main":
        submitted, requests = serve()
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            submitted, requests = pool.submit(serve).result()
    return Run("kvbench", submitted, [r.output_ids for r in requests],
               [r.timeline.first_token_s for r in requests], [r.timeline.token_s[-1] for r in requests])


def run_hf(lm, prompts: list[list[int]], shape: Shape, resolved: dict | None = None) -> Run:
    """transformers' continuous batching: the manager `generate_batch` wraps, driven directly so that its
    set-up stays outside the clock. `resolved`, if given, receives the configuration it actually ran."""
    generation = GenerationConfig(max_new_tokens=shape.output_tokens, do_sample=False, eos_token_id=-1)  # -1: no EOS
    manager = lm.model.init_continuous_batching(generation_config=generation, continuous_batching_config=hf_config(shape))
    manager.warmup()  # builds the paged cache and batch processor; on a CPU no graphs are captured
    manager.start()
    try:
        submitted = time.perf_counter()
        ids = manager.add_requests(prompts, max_new_tokens=shape.output_tokens, record_timestamps=True)
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise SystemExit(f"transformers' continuous batching stopped with {len(results)} of {len(ids)} requests done")
        if resolved is not None:
            cache = manager.batch_processor.cache
            resolved.update(attn_implementation=lm.model.config._attn_implementation, num_blocks=cache.num_blocks,
                            max_batch_tokens=cache.max_batch_tokens,
                            config={k: repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v
                                    for k, v in dataclasses.asdict(manager.continuous_batching_config).items()})
    finally:
        manager.stop(block=True)
        manager.destroy()
    outs = [results[i] for i in ids]
    failed = [o.request_id for o in outs if o.error is not None]
    if failed:
        raise SystemExit(f"transformers' continuous batching failed requests {failed}: {outs[0].error}")
    return Run("transformers", submitted, [list(o.generated_tokens) for o in outs],
               [o.timestamps[0] for o in outs], [o.timestamps[-1] for o in outs])


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index at which two token lists differ (a length difference counts), or None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(ours: Run, theirs: Run) -> dict:
    divergences = [first_divergence(a, b) for a, b in zip(ours.outputs, theirs.outputs)]
    return {"requests_equal": sum(d is None for d in divergences), "requests": len(divergences),
            "first_divergence": divergences}


def main() -> None:
    defaults = Shape()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    for field in dataclasses.fields(Shape):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=getattr(defaults, field.name))
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--kvbench-thread", choices=("worker", "main"), default="worker",
                        help="where kvbench's engine loop runs (transformers' always runs in its manager's thread)")
    parser.add_argument("--out", type=Path, help="a directory for results.json and report.md")
    args = parser.parse_args()
    shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})

    from transformers.utils import logging

    logging.set_verbosity_error()
    lm = load_model(args.model, device="cpu", dtype="float32")
    prompts = build_prompts(lm.config.vocab_size, shape)
    warm = Shape(requests=2, prompt_tokens=16, output_tokens=4, max_num_seqs=2)
    run_kvbench(lm, build_prompts(lm.config.vocab_size, warm), warm, args.kvbench_thread)
    resolved: dict = {}
    run_hf(lm, build_prompts(lm.config.vocab_size, warm), warm)
    trials = []
    for trial in range(args.trials):
        order = ("kvbench", "transformers") if trial % 2 == 0 else ("transformers", "kvbench")
        runs = {name: run_kvbench(lm, prompts, shape, args.kvbench_thread) if name == "kvbench" else run_hf(lm, prompts, shape, resolved)
                for name in order}
        ours, theirs = runs["kvbench"].summary(), runs["transformers"].summary()
        record = {"trial": trial, "order": list(order), "kvbench": ours, "transformers": theirs,
                  "ratio": ours["output_tok_s"] / theirs["output_tok_s"],
                  "agreement": agreement(runs["kvbench"], runs["transformers"]),
                  "outputs": {name: run.outputs for name, run in runs.items()}}
        trials.append(record)
        a = record["agreement"]
        print(f"trial {trial} ({' then '.join(order)}): kvbench {ours['output_tok_s']:.1f} tok/s ({ours['wall_s']:.1f} s), "
              f"transformers {theirs['output_tok_s']:.1f} tok/s ({theirs['wall_s']:.1f} s): ratio {record['ratio']:.2f}x; "
              f"{a['requests_equal']}/{a['requests']} requests token-equal", flush=True)
    stable = {name: all(t["outputs"][name] == trials[0]["outputs"][name] for t in trials) for name in ("kvbench", "transformers")}
    ratios = [t["ratio"] for t in trials]
    print(f"ratio kvbench / transformers: mean {statistics.fmean(ratios):.2f}x over {len(ratios)} trials "
          f"({', '.join(f'{r:.2f}' for r in ratios)}); outputs identical across trials: {stable}")
    if args.out:
        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "model": lm.name,
                  "shape": dataclasses.asdict(shape), "kvbench_thread": args.kvbench_thread, "environment": describe(lm.device),
                  "kvbench_config": engine_config(shape).to_dict(), "transformers_config": resolved,
                  "ratio_mean": statistics.fmean(ratios), "outputs_identical_across_trials": stable, "trials": trials}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / "report.md", report(record))


def report(record: dict) -> str:
    s = record["shape"]
    lines = [f"# kvbench engine vs transformers continuous batching ({record['date']})", "",
             f"`{record['command']}` at commit {record['environment']['git_commit']}", "",
             f"{s['requests']} requests of {s['prompt_tokens']} prompt / {s['output_tokens']} output tokens, all at once; "
             f"kvbench's loop in the {record['kvbench_thread']} thread; "
             f"mean ratio **{record['ratio_mean']:.2f}x** (kvbench / transformers output tok/s).", "",
             "| trial | order | kvbench tok/s | wall s | TTFT median / max s | transformers tok/s | wall s "
             "| TTFT median / max s | ratio | requests token-equal | first divergences |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in record["trials"]:
        k, h, a = t["kvbench"], t["transformers"], t["agreement"]
        divergences = sorted(d for d in a["first_divergence"] if d is not None)
        lines.append(f"| {t['trial']} | {' then '.join(t['order'])} | {k['output_tok_s']:.1f} | {k['wall_s']:.1f} "
                     f"| {k['ttft_s_median']:.1f} / {k['ttft_s_max']:.1f} | {h['output_tok_s']:.1f} | {h['wall_s']:.1f} "
                     f"| {h['ttft_s_median']:.1f} / {h['ttft_s_max']:.1f} | {t['ratio']:.2f}x "
                     f"| {a['requests_equal']}/{a['requests']} | {divergences or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
