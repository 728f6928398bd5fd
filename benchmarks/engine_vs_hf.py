"""Decode speed of kvbench's engine against transformers' `model.generate()`, same cache, same prompt.

Both are timed the same way, from outside: decode time = wall time for N new tokens minus wall
time for 1 new token (the prefill + first token), so decode tokens/s = (N - 1) / that difference.
Runs alternate between the two to spread any drift of the machine evenly; medians are reported.

    python benchmarks/engine_vs_hf.py [--model smollm2-135m] [--prompt-tokens 512] [--new-tokens 64] [--out FILE.json]

`--out` records every run, the medians and the environment (benchmarks/recorded/engine-vs-hf/results.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from transformers import DynamicCache

from kvbench.bench.environment import describe
from kvbench.bench.records import atomic_write_text
from kvbench.workloads.synthetic import synthetic_ids
from kvbench.device import clock
from kvbench.engine import GenerationConfig, generate
from kvbench.engine.model_runner import cache_keyword
from kvbench.models import load_model
from kvbench.strategies import build_strategy


def time_engine(lm, prompt, new_tokens):
    start = clock(lm.device)
    generate(lm, build_strategy("dynamic"), [prompt], GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False))
    return clock(lm.device) - start


@torch.inference_mode()
def time_hf(lm, prompt, new_tokens):
    ids = torch.tensor([prompt], device=lm.device)
    start = clock(lm.device)
    out = lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, **{cache_keyword(type(lm.model)): DynamicCache(config=lm.config)}, pad_token_id=lm.eos_token_ids[0],
    )
    elapsed = clock(lm.device) - start
    assert out.shape[1] == len(prompt) + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the runs, medians and environment to this JSON file")
    args = parser.parse_args()

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    lm = load_model(args.model)
    prompt = synthetic_ids(lm.config.vocab_size, args.prompt_tokens, seed=0)
    runners = {"kvbench engine": time_engine, "transformers generate": time_hf}
    for run in runners.values():  # warmup
        run(lm, prompt, 4)
    decode_tps: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            full = run(lm, prompt, args.new_tokens)
            first = run(lm, prompt, 1)
            decode_tps[name].append((args.new_tokens - 1) / (full - first))
    print(f"model {lm.name} on {lm.device} ({torch.get_num_threads()} threads), prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats, dynamic cache, greedy")
    med = {name: statistics.median(v) for name, v in decode_tps.items()}
    for name, values in decode_tps.items():
        print(f"  {name:<22} decode {med[name]:7.2f} tok/s (median; runs: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  ratio engine / generate: {med['kvbench engine'] / med['transformers generate']:.3f}x")
    # Decode reads every weight once per step: bytes/s achieved shows how close to memory bandwidth we run.
    print(f"  weights streamed by the engine: {lm.weight_bytes * med['kvbench engine'] / 1e9:.2f} GB/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "environment": describe(lm.device),
            "model_fingerprint": lm.fingerprint, "decode_tokens_per_s": decode_tps, "median": med,
            "ratio_engine_over_generate": med["kvbench engine"] / med["transformers generate"],
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
