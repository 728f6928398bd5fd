"""Several client processes, for request rates one event loop cannot send on time (AIPerf sends from workers too).

Requests are dealt round-robin to `workers` spawned processes (spawned, not forked: this process runs a
writer thread). Each runs the same open-loop scheduler (`run_load`) on its share from one common start
time: `time.perf_counter` reads the system's monotonic clock, the same in every process on Linux and
macOS, so every record's times are on one clock. Records come back over a queue and this process writes
them. `max_concurrency` is split between the workers. The workers ignore Ctrl-C; this process stops
them (SIGTERM), and each records its unfinished requests as `interrupted`, as a single client does,
before the interrupt is raised here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable

from kvbench.errors import KvbenchError
from kvbench.load.loadgen import run_async, run_load
from kvbench.load.stream import Endpoint
from kvbench.workloads import Request, Tokenizer

STARTUP_TIMEOUT_S = 120.0  # a worker imports kvbench.load and unpickles its requests and tokenizer
START_LEAD_S = 0.2  # the common start lies this far ahead of the go signal, so every worker's clients are built


def concurrency_shares(max_concurrency: int | None, workers: int) -> list[int | None]:
    """Each worker's cap, summing to `max_concurrency` (None: no cap); LoadSpec refuses fewer slots than workers."""
    if max_concurrency is None:
        return [None] * workers
    return [max_concurrency // workers + (w < max_concurrency % workers) for w in range(workers)]


def run_load_workers(endpoint: Endpoint, requests: list[Request], schedule_s: list[float],
                     on_record: Callable[[dict], None], max_concurrency: int | None, tokenizer: Tokenizer | None,
                     workers: int) -> None:
    """`run_load` over `workers` processes; `on_record` runs here, once per request, however it ended."""
    ctx = multiprocessing.get_context("spawn")
    records, ready, go, start = ctx.Queue(), ctx.Semaphore(0), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(endpoint, requests[w::workers], schedule_s[w::workers], share, tokenizer, records,
                               ready, go, start))
             for w, share in enumerate(concurrency_shares(max_concurrency, workers))]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=STARTUP_TIMEOUT_S):
                raise KvbenchError(f"a load worker did not start within {STARTUP_TIMEOUT_S:g} s")
        start.value = time.perf_counter() + START_LEAD_S
        go.set()
        _drain(records, on_record, len(procs))
    except KeyboardInterrupt:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        _drain(records, on_record, len(procs), timeout_s=30.0)  # the workers record what they had in flight
        raise
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()


def _drain(records, on_record: Callable[[dict], None], workers: int, timeout_s: float | None = None) -> None:
    """Hand every record to `on_record` until each worker has said it is done (None)."""
    done = 0
    while done < workers:
        try:
            item = records.get(timeout=timeout_s)
        except queue.Empty:
            return
        if item is None:
            done += 1
        else:
            on_record(item)


def _worker(endpoint, requests, schedule_s, max_concurrency, tokenizer, records, ready, go, start) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it stops this worker with SIGTERM
    ready.release()
    go.wait()
    try:
        run_async(_until_terminated(run_load(endpoint, requests, schedule_s, records.put, max_concurrency, tokenizer,
                                             start=start.value)))
    except asyncio.CancelledError:
        pass  # run_load has recorded every request it had started
    finally:
        records.put(None)


async def _until_terminated(coro) -> None:
    """Run `coro`, cancelled by SIGTERM (run_load then records what it had in flight)."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    await coro
