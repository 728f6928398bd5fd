"""Spill in `kvbench.serve.Engine`: TTFT of a repeated long-prefix request whose blocks the pool has evicted,
recomputed (no spill) against loaded back from the reuse store's RAM tier or its disk tier.

Each trial and mode runs a fresh engine whose pool holds one request (prefix + question + output): a short
warm-up request, the prefix with a first question (its blocks computed and keyed), a filler request of as many
other tokens (its admission evicts every prefix block: spilled where a spill is set), then the measured
request, the prefix with another question. `ram` spills into a RAM tier of `--spill-ram` bytes; `disk` into a
RAM tier of one block over a disk tier (a fresh directory per trial on the machine's disk; pages dropped after
every write and read), so the prefix comes back from disk. The measured admission also evicts the filler's
blocks, so its TTFT includes spilling them (spill_ms) besides loading the prefix (load_ms): this engine copies
synchronously (vLLM's offloading connector copies on another stream). On a CPU the pool is host memory: RAM
loads are host-to-host copies, not a GPU's PCIe transfer. Greedy tokens are checked equal across modes.
Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock python benchmarks/serve_spill.py --out benchmarks/recorded/serve-spill
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

from kvbench.bench.environment import describe_host
from kvbench.bench.preflight import parse_bytes
from kvbench.bench.records import atomic_write_text
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams

MODES = ("recompute", "ram", "disk")


def timed(engine: Engine, spent: Counter) -> None:
    """Add the seconds the engine's spill spends spilling and loading (find, fetch, copy) to `spent`."""
    spill = engine.spill

    def wrap(name: str, kind: str):
        method = getattr(spill, name)

        def run(*args):
            start = engine.now()
            try:
                return method(*args)
            finally:
                spent[kind] += engine.now() - start
        setattr(spill, name, run)

    for name in ("find", "fetch", "load"):
        wrap(name, "load")
    wrap("spill", "spill")
    engine.kv.pool.on_evict = spill.spill


def trial(lm, args, mode: str, rng: random.Random) -> dict:
    vocab = lm.config.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_tokens)]
    first, second = ([rng.randrange(vocab) for _ in range(args.question_tokens)] for _ in range(2))
    filler = [rng.randrange(vocab) for _ in range(args.prefix_tokens + args.question_tokens)]
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    num_blocks = -(-(args.prefix_tokens + args.question_tokens + args.output_tokens) // args.block_size)
    directory = tempfile.mkdtemp(prefix="kvbench-spill-", dir=args.spill_dir) if mode == "disk" else None
    token_bytes = lm.kv_bytes_per_token
    ram = {"recompute": None, "ram": args.spill_ram, "disk": args.block_size * token_bytes}[mode]
    try:
        engine = Engine(lm, EngineConfig(block_size=args.block_size, num_blocks=num_blocks, kv_spill_ram=ram,
                                         kv_spill_dir=directory, max_num_batched_tokens=args.budget))
        spent = Counter()
        if engine.spill is not None:
            timed(engine, spent)
        engine.generate([[rng.randrange(vocab) for _ in range(64)]], params)  # warm-up
        engine.generate([prefix + first], params)
        engine.generate([filler], params)
        assert not engine.kv.pool.match_prefix(prefix + second), "the filler left prefix blocks in the pool"
        spent.clear()
        steps = engine.num_steps
        request = engine.generate([prefix + second], params)[0]
        line = request.timeline
        first_step = engine.step_log[steps] if steps < len(engine.step_log) else None
        return {"mode": mode, "ttft_ms": (line.first_token_s - line.arrival_s) * 1e3,
                "cached_tokens": request.num_cached, "tier_tokens": request.num_cached_by_tier,
                "load_ms": spent["load"] * 1e3, "spill_ms": spent["spill"] * 1e3,
                "first_step_schedule_ms": first_step.schedule_ms if first_step else None,
                "steps_to_first_token": next(i + 1 for i, s in enumerate(engine.step_log[steps:])
                                             if s.t_s >= line.first_token_s),
                "spill": engine.spill.stats() if engine.spill else None, "output_ids": request.output_ids}
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens (the engine's default)")
    parser.add_argument("--spill-ram", type=parse_bytes, default=parse_bytes("1GiB"))
    parser.add_argument("--spill-dir", default=None, help="where the disk tier's directories go (default: the temp dir)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lm = load_model(args.model)
    rows = []
    for t in range(args.trials):
        for mode in MODES:  # interleaved, so a slow spell of the machine hits every mode
            rows.append({"trial": t, **trial(lm, args, mode, random.Random(args.seed + t))})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("output_ids", "spill")}), flush=True)
    summary = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {k: statistics.median(r[k] for r in mine) for k in ("ttft_ms", "load_ms", "spill_ms")}
        summary[mode]["cached_tokens"] = sorted({r["cached_tokens"] for r in mine})
        summary[mode]["same_tokens_as_recompute"] = all(
            r["output_ids"] == next(o for o in rows if o["mode"] == "recompute" and o["trial"] == r["trial"])["output_ids"]
            for r in mine)
    base = summary["recompute"]["ttft_ms"]
    for mode in MODES:
        summary[mode]["ttft_vs_recompute"] = summary[mode]["ttft_ms"] / base
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"command": shlex.join(sys.argv), "when": datetime.datetime.now(datetime.UTC).isoformat(),
                  "environment": describe_host(), "args": vars(args) | {"out": str(args.out)},
                  "summary": summary, "runs": rows}
        atomic_write_text(args.out / "results.json", json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
