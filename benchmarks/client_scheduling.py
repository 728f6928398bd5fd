"""How precisely `kvbench load` sends at cluster rates: send lag through the real CLI, against the fake server.

The fake server (`python -m kvbench.load.fake`, no token delay, 4 output tokens per request) runs in its own
process; for each offered rate, `kvbench load` runs as its own process exactly as a user runs it (Poisson
arrivals for `--seconds`, records written by its results writer) and the send lag (actual minus scheduled
send) is read back from results.jsonl. Extra `kvbench load` flags go after `--`.
Run under the CPU lock:  flock /tmp/kvbench-cpu.lock .venv/bin/python benchmarks/client_scheduling.py
`--out FILE.json` records the rows, the command and the host (benchmarks/recorded/client-scheduling/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvbench.bench.environment import describe_host
from kvbench.bench.metrics import summarize
from kvbench.bench.records import atomic_write_text, read_records, read_run_info


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, rate: float, args: argparse.Namespace, scratch: Path, server_pid: int) -> dict:
    out = scratch / f"rate-{rate:g}"
    workload = scratch / "prompt.jsonl"
    workload.write_text(json.dumps({"messages": [{"role": "user", "content": "a short prompt"}]}) + "\n")
    command = [str(Path(sys.executable).with_name("kvbench")), "load", "--url", url, "--workload", str(workload),
               "--request-rate", f"{rate:g}", "--duration", f"{args.seconds:g}", "--output-tokens",
               str(args.output_tokens), "--out", str(out), "--no-progress", *args.load_flags]
    cpu, wall = cpu_seconds(server_pid), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    server_cpu_share = (cpu_seconds(server_pid) - cpu) / (time.perf_counter() - wall)
    records = read_records(out / "results.jsonl")
    ok = [r for r in records if r["status"] == "ok"]
    last_send = max(r["sent_s"] for r in records)
    lag = summarize(r["send_lag_ms"] for r in records)
    point = next(iter(read_run_info(out)["points"].values()))
    return {"offered": rate, "requests": len(records), "ok": len(ok),
            "sent_per_s": (len(records) - 1) / last_send, "completed_per_s": len(ok) / max(r["end_s"] for r in records),
            "lag_p50": lag.p50, "lag_p99": lag.p99, "lag_max": lag.max, "client_cpu_share": point["client_cpu_share"],
            "server_cpu_share": server_cpu_share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="250,500,1000")
    parser.add_argument("--seconds", type=float, default=4.0, help="arrivals per rate")
    parser.add_argument("--output-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write the rows and the host description to this JSON file")
    parser.add_argument("load_flags", nargs="*", help="extra kvbench load flags, after --")
    args = parser.parse_args()
    rows = []
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kvbench.load.fake", "--port", str(port)],
                              stdout=subprocess.DEVNULL)
    scratch = Path(tempfile.mkdtemp(prefix="client-scheduling-"))
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_ready(url)
        print("| offered req/s | requests | ok | sent req/s | completed req/s | send lag p50 ms | p99 ms | max ms "
              "| client CPU (cores) | server CPU (cores) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for rate in (float(r) for r in args.rates.split(",")):
            m = measure(url, rate, args, scratch, server.pid)
            rows.append(m)
            print(f"| {m['offered']:g} | {m['requests']} | {m['ok']} | {m['sent_per_s']:.0f} | {m['completed_per_s']:.0f} "
                  f"| {m['lag_p50']:.2f} | {m['lag_p99']:.2f} | {m['lag_max']:.2f} | {m['client_cpu_share']:.2f} "
                  f"| {m['server_cpu_share']:.2f} |",
                  flush=True)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                                                "host": describe_host(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
