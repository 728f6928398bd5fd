"""HTTP against in-process: `kvbench load` -> `kvbench serve` next to the same workload through the engine.

One workload (kvbench load's `random` kind: `--requests` prompts of `--prompt-tokens` tokens, EOS ignored,
`--output-tokens` each), one engine config (`max_num_seqs` = the client's concurrency). Rounds alternate:
1. in-process: a fresh `Engine` serves every prompt (the texts kvbench load sends, tokenized as the server
   tokenizes them), all at once; output tok/s = output tokens / wall time from start to the last token;
2. HTTP: a fresh `Engine` behind `kvbench.serve.Server` (the code `kvbench serve` runs) in this process,
   driven by a `kvbench load` subprocess at rate inf with `--max-concurrency` = max_num_seqs; output tok/s
   from its summary (output tokens / first send to last end). Client and server share the machine's cores.
Each side gets one short warm-up request first. The server's asyncio loop thread CPU time (HTTP, JSON,
tokenization, detokenization, SSE) is measured around the load run and divided by the tokens streamed:
the per-token cost of the HTTP side. Run under the CPU lock:
  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/serve_http.py --out benchmarks/recorded/serve-http
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from kvbench.bench.environment import describe_host
from kvbench.bench.records import atomic_write_text
from kvbench.models import EMBEDDED, load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams
from kvbench.serve.server import Server, ServerConfig
from kvbench.workloads import WorkloadSpec, build_requests
from kvbench.workloads.tokenizer import load_tokenizer

NAME = "m"


def os_threads() -> int:
    """Threads of this process (Python's and torch's), recorded per round to see any left behind."""
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Threads:")).split()[1])


def in_process(lm, config: EngineConfig, prompts: list[list[int]], output_tokens: int) -> dict:
    gc.collect()  # the previous round's engine and server go before this one is timed
    threads = os_threads()
    engine = Engine(lm, config)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    sampling = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    requests = engine.generate(prompts, sampling)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in requests)
    return {"output_tokens": tokens, "duration_s": wall, "output_tok_s": tokens / wall, "os_threads": threads}


def over_http(lm, config: EngineConfig, args, out: Path) -> dict:
    engine = Engine(lm, config)
    server = Server(engine, ServerConfig(NAME, port=0))
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_until_complete(server.serve_until_stopped())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(60)
    url = f"http://127.0.0.1:{server.port}/v1"

    async def loop_cpu() -> float:
        return time.thread_time()

    try:
        httpx.post(f"{url}/completions", json={"model": NAME, "prompt": "warm up", "max_tokens": 2}, timeout=60)
        cpu0 = asyncio.run_coroutine_threadsafe(loop_cpu(), loop).result()
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        command = [sys.executable, "-m", "kvbench.cli", "load", "--url", url, "--tokenizer", EMBEDDED,
                   "--workload", "random", "--prompt-tokens", str(args.prompt_tokens), "--output-tokens",
                   str(args.output_tokens), "--num-requests", str(args.requests), "--max-concurrency",
                   str(args.max_num_seqs), "--request-rate", "inf", "--ignore-eos", "--same-prompts-each-rate",
                   "--out", str(out), "--no-progress"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        cpu1 = asyncio.run_coroutine_threadsafe(loop_cpu(), loop).result()
        self1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        loop.call_soon_threadsafe(server.stop)
        thread.join(60)
        loop.close()
    point = json.loads((out / "summary.json").read_text())["points"]["inf"]
    tokens = point["output_tokens"]
    return {"output_tokens": tokens, "duration_s": point["duration_s"], "output_tok_s": point["output_token_throughput"],
            "failed": point["failed"], "loop_cpu_s": cpu1 - cpu0, "loop_cpu_us_per_token": (cpu1 - cpu0) / tokens * 1e6,
            "server_cpu_s": (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime),
            "client_cpu_s": point.get("client_cpu_s"), "ttft_ms_p50": point["ttft_ms.p50"], "itl_ms_p50": point["itl_ms.p50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lm = load_model(args.model, "cpu")
    workload = WorkloadSpec(kind="random", prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=0)
    texts = [r.prompt for r in build_requests(workload, args.requests, load_tokenizer(EMBEDDED), form="text")]
    prompts = [lm.encode(t, chat=False) for t in texts]  # as the server tokenizes a completions prompt
    config = EngineConfig(max_num_seqs=args.max_num_seqs)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            local = in_process(lm, config, prompts, args.output_tokens)
            http = over_http(lm, config, args, Path(tmp) / f"load-{i}")
            rounds.append({"in_process": local, "http": http, "ratio": http["output_tok_s"] / local["output_tok_s"]})
            print(f"round {i}: in-process {local['output_tok_s']:.1f} tok/s, HTTP {http['output_tok_s']:.1f} tok/s "
                  f"= {rounds[-1]['ratio']:.3f}x; loop CPU {http['loop_cpu_us_per_token']:.0f} us/token", flush=True)
    local = sum(r["in_process"]["output_tokens"] for r in rounds) / sum(r["in_process"]["duration_s"] for r in rounds)
    http = sum(r["http"]["output_tokens"] for r in rounds) / sum(r["http"]["duration_s"] for r in rounds)
    record = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in sys.argv), "args": vars(args) | {"out": str(args.out)},
              "engine_config": config.to_dict(), "host": describe_host(), "torch_threads": torch.get_num_threads(),
              "in_process_tok_s": local, "http_tok_s": http, "ratio": http / local,
              "ratio_median_round": statistics.median(r["ratio"] for r in rounds), "rounds": rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(record, indent=1) + "\n")
    print(f"all rounds: in-process {local:.1f} tok/s, HTTP {http:.1f} tok/s = {http / local:.3f}x "
          f"(median round {record['ratio_median_round']:.3f}x)")


if __name__ == "__main__":
    main()
