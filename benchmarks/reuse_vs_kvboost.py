"""kvbench's cross-request reuse against kvboost 0.9.0, on the same workloads and the same model.

    .venv/bin/python benchmarks/reuse_vs_kvboost.py [--out benchmarks/recorded/reuse-vs-kvboost]

(`make setup` installs kvboost through the `peers` extra.) Both systems run the embedded
SmolLM2-135M-Instruct in float32 on the same model object, one after the other, on the reuse suite's
workloads given as text (kvboost takes text; kvbench is given kvboost's own tokenization of the same
text, so both see identical token ids). For each workload: a cold request on an empty cache, then warm
requests with new questions. TTFT is measured the same way for both: a wall clock from the call to the
first generated token on the host (kvboost: its `on_token` callback, which fires after `.item()`).
Greedy output (32 tokens) is compared with plain transformers `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvbench.workloads import WorkloadSpec, build_requests  # noqa: E402
from kvbench.engine import GenerationConfig, generate  # noqa: E402
from kvbench.models import load_model  # noqa: E402
from kvbench.reuse import ReuseCache, ReuseConfig  # noqa: E402
from kvbench.strategies import build_strategy  # noqa: E402

WORKLOADS = ("system-prompt", "rag-prefix-500", "rag-prefix-2000", "rag-interior-500", "rag-interior-2000")
NEW_TOKENS = 32


def reference_tokens(lm, ids: list[int]) -> list[int]:
    """Plain transformers greedy decoding: up to NEW_TOKENS tokens, stopping after EOS like kvboost does."""
    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def same_greedy(tokens: list[int], reference: list[int]) -> bool:
    """Identical up to where the reference stopped (kvbench here generates past EOS; kvboost stops at it)."""
    return tokens[:len(reference)] == reference


def run_kvboost(engine, prompts: list[str], mode) -> list[dict]:
    engine.reset_cache()
    rows = []
    for prompt in prompts:
        ids, first = [], {}

        def on_token(token: int) -> None:
            if not ids:
                first["t"] = time.perf_counter()
            ids.append(token)

        start = time.perf_counter()
        result = engine.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, mode=mode, on_token=on_token)
        rows.append({"ttft_ms": (first["t"] - start) * 1e3, "cached_tokens": result.cached_tokens,
                     "prompt_tokens": result.prompt_tokens, "tokens": ids})
    return rows


def run_kvbench(lm, token_prompts: list[list[int]], config: ReuseConfig | None) -> list[dict]:
    cache = ReuseCache(lm, config) if config else None
    dynamic = build_strategy("dynamic")
    rows = []
    for ids in token_prompts:
        result = generate(lm, dynamic, [ids], GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False), reuse=cache)
        rows.append({"ttft_ms": result.step_times_s[0] * 1e3, "cached_tokens": result.reuse.cached_tokens if cache else 0,
                     "prompt_tokens": len(ids), "tokens": result.tokens[0]})
    return rows


def main() -> None:
    from kvboost import GenerationMode, KVBoost

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/recorded/reuse-vs-kvboost"))
    parser.add_argument("--requests", type=int, default=4)
    args = parser.parse_args()
    lm = load_model("smollm2-135m", device="cpu")
    tok = lm.tokenizer
    engine = KVBoost(lm.model, tok, max_cache_bytes=4 << 30, recompute_strategy="selective", device="cpu")
    systems = {
        "transformers (no reuse)": None,
        "kvbench prefix": ReuseConfig(mode="prefix"),
        "kvbench chunk:selective": ReuseConfig(mode="chunk", recompute="selective"),
        "kvboost prefix_cache": GenerationMode.PREFIX_CACHE,
        "kvboost chunk_kv_reuse (selective)": GenerationMode.CHUNK_KV_REUSE,
    }
    generate(lm, build_strategy("dynamic"), [list(range(16, 80))], GenerationConfig(max_new_tokens=2))  # warm kernels
    table = []
    for workload in WORKLOADS:
        spec = WorkloadSpec(kind=f"reuse:{workload}")
        prompts = [r.prompt for r in build_requests(spec, args.requests, tok, form="text")]
        token_prompts = [tok(p)["input_ids"] for p in prompts]  # what kvboost feeds its model
        references = [reference_tokens(lm, ids) for ids in token_prompts]
        for name, how in systems.items():
            rows = (run_kvboost(engine, prompts, how) if name.startswith("kvboost")
                    else run_kvbench(lm, token_prompts, how))
            warm = rows[1:]
            entry = {
                "workload": workload, "system": name, "prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows),
                "cold_ttft_ms": rows[0]["ttft_ms"], "warm_ttft_ms": sum(r["ttft_ms"] for r in warm) / len(warm),
                "warm_cached_tokens": sum(r["cached_tokens"] for r in warm) / len(warm),
                "greedy_match": sum(same_greedy(r["tokens"], ref) for r, ref in zip(rows, references)) / len(rows),
            }
            table.append(entry)
            print(json.dumps(entry))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = ["| workload | system | prompt tokens | cold TTFT ms | warm TTFT ms | warm cached tokens | greedy match vs transformers |",
             "|---|---|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['workload']} | {e['system']} | {e['prompt_tokens']:.0f} | {e['cold_ttft_ms']:.1f} | "
                     f"{e['warm_ttft_ms']:.1f} | {e['warm_cached_tokens']:.0f} | {e['greedy_match']:.2f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
