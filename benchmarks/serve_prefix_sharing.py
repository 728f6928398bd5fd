"""Prefix sharing in `kvbench.serve.Engine`: N concurrent requests on one long system prompt hold its KV once.

One request runs the system prompt first (its prefill keys the prompt's full blocks); then N requests, each the
system prompt plus its own question, arrive at once and run together. KV bytes are exact (the pool's block
accounting of computed token slots, no timing), so this runs on any model without the CPU lock. Reports, at the
step with the most KV in use: KV bytes used, the bytes of one copy of the system prompt plus every request's own
tokens (what perfect sharing holds), and the same run with prefix caching off (every request its own copy).
  python benchmarks/serve_prefix_sharing.py --out benchmarks/recorded/serve-prefix-sharing
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import sys
from pathlib import Path

from kvbench.bench.environment import describe_host
from kvbench.bench.records import atomic_write_text
from kvbench.models import load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams


def serve(lm, args, caching: bool) -> dict:
    rng = random.Random(args.seed)
    system = [rng.randrange(lm.config.vocab_size) for _ in range(args.prefix_tokens)]
    questions = [[rng.randrange(lm.config.vocab_size) for _ in range(args.question_tokens)]
                 for _ in range(args.requests)]
    engine = Engine(lm, EngineConfig(max_num_seqs=args.requests, enable_prefix_caching=caching,
                                     max_num_batched_tokens=args.budget))
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    engine.add_request(system, SamplingParams(max_tokens=1, ignore_eos=True))
    engine.run_until_idle()
    ids = [engine.add_request(system + q, params) for q in questions]
    peak = None  # (bytes used, bytes of one prefix copy + each running request's own computed tokens, running)
    while engine.has_work():
        engine.step()
        running = engine.scheduler.running
        own = sum(r.num_computed - args.prefix_tokens for r in running)
        usage = engine.kv.pool.usage()
        here = (usage.bytes_used, (args.prefix_tokens + own) * usage.token_bytes, len(running), usage.used)
        peak = max(peak or here, here)
    used, one_copy, running, blocks = peak
    return {"prefix_caching": caching, "running": running, "kv_bytes_used": used, "kv_blocks_used": blocks,
            "one_copy_bytes": one_copy, "used_over_one_copy": used / one_copy,
            "cached_tokens": [engine.requests[i].num_cached for i in ids]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=8)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lm = load_model(args.model)
    rows = [serve(lm, args, caching) for caching in (True, False)]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"command": shlex.join(sys.argv), "when": datetime.datetime.now(datetime.UTC).isoformat(),
                  "environment": describe_host(), "args": vars(args) | {"out": str(args.out)}, "runs": rows}
        atomic_write_text(args.out / "results.json", json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
