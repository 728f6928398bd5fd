"""How fast the load client schedules: requests/s it sustains and its send lag, against the fake server.

The fake server (zero delay, `kvbench.load.fake`) runs in its own process so that it does not
share the client's interpreter; the client runs `kvbench.load.loadgen.run_load` at each offered
rate and we read the achieved rate and the send lag (actual minus scheduled send) from its records.
Run under the CPU lock:  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/client_scheduling.py
`--out FILE.json` records the rows and the host (benchmarks/recorded/client-scheduling/results.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kvbench.bench.environment import describe_host
from kvbench.bench.metrics import summarize
from kvbench.bench.records import atomic_write_text
from kvbench.load.arrivals import Arrivals
from kvbench.load.loadgen import run_load
from kvbench.load.stream import Endpoint
from kvbench.workloads import Request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"fake server at {url} did not come up")


def measure(url: str, rate: float, count: int, output_tokens: int, seed: int) -> dict:
    records: list[dict] = []
    endpoint = Endpoint(url, "fake-model", "completions", timeout_s=30.0)
    requests = [Request(i, ({"role": "user", "content": f"request {i}"},), output_tokens) for i in range(count)]
    schedule = Arrivals(rate, 1.0, seed).schedule(count)
    asyncio.run(run_load(endpoint, requests, schedule, records.append))
    ok = [r for r in records if r["status"] == "ok"]
    last_send = max(r["sent_s"] for r in records)
    lag = summarize(r["send_lag_ms"] for r in records)
    return {"offered": rate, "requests": count, "ok": len(ok), "sent_per_s": (count - 1) / last_send if last_send else float("inf"),
            "completed_per_s": len(ok) / max(r["end_s"] for r in records), "lag_p50": lag.p50, "lag_p99": lag.p99,
            "lag_max": lag.max}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="250,500,750,1000")
    parser.add_argument("--seconds", type=float, default=4.0, help="arrivals per rate")
    parser.add_argument("--output-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write the rows and the host description to this JSON file")
    args = parser.parse_args()
    rows = []
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kvbench.load.fake", "--port", str(port)],
                              stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_ready(url)
        measure(url, 200.0, 200, args.output_tokens, seed=99)  # warm up: imports, connections
        print("| offered req/s | requests | ok | sent req/s | completed req/s | send lag p50 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|---|---|---|")
        for rate in (float(r) for r in args.rates.split(",")):
            m = measure(url, rate, int(rate * args.seconds), args.output_tokens, seed=0)
            rows.append(m)
            print(f"| {m['offered']:g} | {m['requests']} | {m['ok']} | {m['sent_per_s']:.0f} | {m['completed_per_s']:.0f} "
                  f"| {m['lag_p50']:.2f} | {m['lag_p99']:.2f} | {m['lag_max']:.2f} |", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "host": describe_host(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
