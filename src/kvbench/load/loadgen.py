"""The open-loop scheduler: each request is fired at its scheduled time, whatever earlier ones are doing.

A dispatcher sleeps until each send time and starts that request as its own task, so a slow
server never delays later sends (no coordinated omission); `max_concurrency`, when set, makes a
request wait for a free slot, and that wait shows up as send lag. Every request, however it ends
(finished, failed, or cancelled by Ctrl-C), hands its record to `on_record` exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kvbench.load.stream import Endpoint, Trace, http_clients, stream_request
from kvbench.workloads import Request, Tokenizer

T = TypeVar("T")


def event_loop() -> str:
    """The event loop that run_async uses: uvloop where installed (the `load` extra), else asyncio's own."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where installed: its loop and transports cost the client about half the CPU
    per request of asyncio's, so a busy loop delays fewer sends."""
    if event_loop() == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


async def run_load(
    endpoint: Endpoint,
    requests: list[Request],
    schedule_s: list[float],
    on_record: Callable[[dict], None],
    max_concurrency: int | None = None,
    tokenizer: Tokenizer | None = None,
    start: float | None = None,
) -> None:
    """Send `requests[i]` at `schedule_s[i]` seconds after the start (`start`: a `time.perf_counter()` value shared
    by several worker processes; default now); returns when every request ended."""
    if len(requests) != len(schedule_s):
        raise ValueError(f"{len(requests)} requests but {len(schedule_s)} send times")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    clients = http_clients(max_concurrency or len(requests), endpoint.timeout_s)
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        stack.callback(gc.unfreeze)
        # Everything built so far (requests, clients, imported modules) leaves the collector's view for the run:
        # a full collection scanned it all, one pause of many ms that delayed every send due meanwhile
        # (p99 send lag at 1000 req/s 72 -> 13 ms through the CLI).
        gc.freeze()
        t0 = time.perf_counter() if start is None else start

        async def one(request: Request, at: float) -> None:
            trace = Trace(request, at, t0)
            try:
                async with slots if slots else contextlib.nullcontext():
                    await stream_request(clients[request.index % len(clients)], endpoint, trace)
            except asyncio.CancelledError:
                trace.fail("interrupted", "the run was interrupted before this request ended")
                raise
            finally:
                on_record(trace.record(tokenizer, chat=endpoint.kind == "chat"))

        tasks = []
        try:
            for request, at in zip(requests, schedule_s):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(request, at)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
