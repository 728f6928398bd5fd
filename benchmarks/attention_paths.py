"""Attention methods for q new tokens after p cached ones, timed inside the model.

For each cached length p, the same q new tokens run through the whole model (a) with no cache and
(b) after p cached tokens, once per attention method; the ratio (b) / (a) is what a warm prefill,
a prefill chunk or a multi-turn request pays for its cached context. Methods:

- dense mask: transformers' sdpa as it ships (a 4D boolean mask, repeated KV heads, masked SDPA)
- split-merge: kvbench's path (`kvbench.engine.attention`): cached keys unmasked, new keys causal,
  merged by log-sum-exp
- one GEMM: scores of all queries against all keys in one matmul (GQA heads folded), the causal
  block masked in place, softmax, one matmul with the values
- per-query loop: each new token attends its own prefix, unmasked (q SDPA calls per layer)
- flex: transformers' flex_attention, compiled by torch inductor (compile time reported apart)

The cache is built once per p, untimed, and cropped back after every timed call. Timed calls keep the last
position's logits only, as a prefill does. Methods take turns
round by round (order rotated), so drift of the machine spreads over all of them; medians are reported.
Logits of every method at every new position are compared with the dense mask's (max abs difference,
argmax agreement), in the untimed first call.

    python benchmarks/attention_paths.py [--new-tokens 50] [--rounds 7] [--out benchmarks/recorded/attention-paths]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvbench.bench.environment import describe
from kvbench.bench.records import atomic_write_text
from kvbench.workloads.synthetic import synthetic_ids
from kvbench.engine import attention
from kvbench.engine.model_runner import forward
from kvbench.models import load_model

# (model, cached lengths): the embedded model's context is 8192 tokens but its GGUF says 2048 was trained;
# 8000 runs on the random-weight model of the same shape.
SETUPS = [("smollm2-135m", [500, 2000]), ("synthetic:135m", [8000])]


def one_gemm(query, key, value, scaling):
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    folded = query.reshape(batch, kv_heads, groups * q_len, dim)
    scores = torch.matmul(folded, key.transpose(-1, -2)).mul_(scaling)
    future = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).triu_(1)
    scores.view(batch, kv_heads, groups, q_len, kv_len)[..., kv_len - q_len:].masked_fill_(future, float("-inf"))
    return torch.matmul(scores.softmax(-1), value).reshape(batch, heads, q_len, dim)


def per_query(query, key, value, scaling):
    q_len, cached = query.shape[2], key.shape[2] - query.shape[2]
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, i:i + 1], key[:, :, :cached + i + 1], value[:, :, :cached + i + 1], scale=scaling,
        enable_gqa=True) for i in range(q_len)], dim=2)


def tail_method(tail):
    """An attention-interface function running `tail` on the causal-tail case, sdpa otherwise."""
    def run(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if attention_mask is None and 1 < query.shape[2] < key.shape[2]:
            return tail(query, key, value, scaling).transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return run


def register_methods() -> dict[str, str]:
    """Method label -> attn_implementation name (the benchmark's own names are registered here)."""
    attention.register()
    AttentionInterface.register("bench-dense", sdpa_attention_forward)
    AttentionMaskInterface.register("bench-dense", sdpa_mask)
    for name, tail in (("bench-gemm", one_gemm), ("bench-per-query", per_query)):
        AttentionInterface.register(name, tail_method(tail))
        AttentionMaskInterface.register(name, attention.tail_mask)
    return {"dense mask": "bench-dense", "split-merge (kvbench)": "sdpa", "one GEMM": "bench-gemm",
            "per-query loop": "bench-per-query", "flex (compiled)": "flex_attention"}


@torch.inference_mode()
def timed(lm, implementation, ids, cache, cached, logits_to_keep=1):
    lm.config._attn_implementation = implementation
    try:
        start = time.perf_counter()
        logits = forward(lm.model, ids, cache=cache, logits_to_keep=logits_to_keep,
                         positions=torch.arange(cached, cached + ids.shape[1])[None] if cache is not None else None)
        elapsed = time.perf_counter() - start
    finally:
        lm.config._attn_implementation = "sdpa"
        if cache is not None:
            cache.crop(-ids.shape[1])  # back to the p cached tokens
    return elapsed, logits


def measure(lm, cached, methods, new_tokens, rounds):
    prompt = torch.tensor([synthetic_ids(lm.config.vocab_size, cached + new_tokens, seed=0)])
    cache = DynamicCache(config=lm.config)
    with torch.inference_mode():
        forward(lm.model, prompt[:, :cached], cache=cache)
    new = prompt[:, cached:]
    point = {"cached": cached, "new_tokens": new_tokens, "methods": {}}
    baseline_ms, reference = [], None
    for label, implementation in methods.items():  # warmup, with every position's logits; flex compiles here
        start = time.perf_counter()
        _, logits = timed(lm, implementation, new, cache, cached, logits_to_keep=0)
        entry = point["methods"][label] = {"first_call_s": time.perf_counter() - start, "ms": []}
        if reference is None:
            reference = logits
        entry["max_abs_logit_diff"] = float((logits - reference).abs().max())
        entry["argmax_identical"] = bool((logits.argmax(-1) == reference.argmax(-1)).all())
    timed(lm, "sdpa", new, None, 0)
    labels = list(methods)
    for r in range(rounds):
        baseline_ms.append(timed(lm, "sdpa", new, None, 0)[0] * 1e3)
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            point["methods"][label]["ms"].append(timed(lm, methods[label], new, cache, cached)[0] * 1e3)
    point["no_cache_ms"] = baseline_ms
    base = statistics.median(baseline_ms)
    for entry in point["methods"].values():
        entry["median_ms"] = statistics.median(entry["ms"])
        entry["ratio_to_no_cache"] = entry["median_ms"] / base
    point["no_cache_median_ms"] = base
    return point


def gemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matmul rate on a square n x n product (median of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def flops(config, cached: int, new_tokens: int) -> dict:
    """GFLOP of the q new tokens' weight matmuls (every decoder linear layer) and of their attention over
    the p cached keys (q.k and p.v, every query head); what the ratio would be if both ran at one rate."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = (2 * config.hidden_size * config.hidden_size + 2 * config.hidden_size * kv
                 + 3 * config.hidden_size * config.intermediate_size)
    weights = 2 * per_layer * config.num_hidden_layers * new_tokens / 1e9
    attention = 4 * config.num_attention_heads * head_dim * cached * config.num_hidden_layers * new_tokens / 1e9
    return {"weights_gflop": weights, "cached_attention_gflop": attention, "equal_rate_ratio": 1 + attention / weights}


def render(results) -> str:
    lines = [f"# Attention paths: {results['new_tokens']} new tokens after p cached, whole model, fp32, "
             f"{results['threads']} threads", "", f"Command: `{results['command']}`  ", f"Date: {results['date']}",
             "", "| model | p | method | median ms | no-cache ms | ratio | max abs logit diff vs dense | argmax same |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for point in results["points"]:
        for label, m in point["methods"].items():
            lines.append(f"| {point['model']} | {point['cached']} | {label} | {m['median_ms']:.1f} | "
                         f"{point['no_cache_median_ms']:.1f} | {m['ratio_to_no_cache']:.2f}x | "
                         f"{m['max_abs_logit_diff']:.1e} | {'yes' if m['argmax_identical'] else 'NO'} |")
    slow_first = ", ".join(f"{p['model']} p={p['cached']} {label} {m['first_call_s']:.1f} s"
                           for p in results["points"] for label, m in p["methods"].items() if m["first_call_s"] > 5)
    lines += ["", "| model | p | weight GFLOP (q tokens) | cached-attention GFLOP | ratio if both ran at one rate |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {p['model']} | {p['cached']} | {p['weights_gflop']:.1f} | {p['cached_attention_gflop']:.1f} | "
              f"{p['equal_rate_ratio']:.2f}x |" for p in results["points"]]
    lines += ["", f"fp32 matmul rate of this machine in the same run (1024^3): {results['gemm_1024_gflops']:.0f} GFLOP/s."]
    lines += ["", "ratio: median time of the q new tokens after p cached / median time of the same tokens with no "
              "cache (kvbench's path; the no-cache forward is the same for every method). First calls, untimed "
              f"(flex compiles there; those over 5 s: {slow_first or 'none'})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip", default="", help="comma-separated method labels to leave out (e.g. 'flex (compiled)')")
    parser.add_argument("--out", type=Path, help="directory for results.json and report.md")
    args = parser.parse_args()

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    all_methods = register_methods()
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    points = []
    for model, lengths in SETUPS:
        lm = load_model(model)
        for cached in lengths:
            methods = {k: v for k, v in all_methods.items() if k not in skipped
                       and not (k == "per-query loop" and cached > 2000)}  # q SDPA calls per layer: minutes at 8000
            point = measure(lm, cached, methods, args.new_tokens, args.rounds)
            point["model"] = model
            point.update(flops(lm.config, cached, args.new_tokens))
            points.append(point)
            for label, m in point["methods"].items():
                print(f"{model} p={cached:5d} {label:<22} {m['median_ms']:8.1f} ms  {m['ratio_to_no_cache']:.2f}x "
                      f"no-cache {point['no_cache_median_ms']:.1f} ms  max|dlogit| {m['max_abs_logit_diff']:.1e}"
                      f"  argmax same {m['argmax_identical']}", flush=True)
    peak = gemm_gflops()
    print(f"fp32 matmul 1024^3: {peak:.0f} GFLOP/s")
    results = {"gemm_1024_gflops": peak, "command": "python benchmarks/attention_paths.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, "")),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "new_tokens": args.new_tokens,
               "rounds": args.rounds, "threads": torch.get_num_threads(), "environment": describe(torch.device("cpu")),
               "points": points}
    print(render(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
        atomic_write_text(args.out / "report.md", render(results))


if __name__ == "__main__":
    main()
