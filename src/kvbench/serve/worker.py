"""The engine in its own thread, fed by the server's asyncio loop.

The loop side calls `submit` and `abort` (they only queue a command and wake the thread). The thread
runs every engine call: it applies the queued commands, steps while there is work, and hands each
step's outputs back to the loop in one `call_soon_threadsafe`, where each request's `Stream` queue
receives its own. torch releases the GIL inside its ops, so the loop keeps serving during a step.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field

from kvbench.errors import KvbenchError
from kvbench.serve.engine import Engine
from kvbench.serve.metrics import ServerMetrics
from kvbench.serve.request import FinishReason, RequestOutput, SamplingParams


class EngineFailure(Exception):
    """Why a request ended without finishing: a step raised (500; the engine keeps serving new requests),
    or the server shut down (503)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Stream:
    """One request as the loop side sees it; outputs (or an `EngineFailure`) arrive on `outputs`."""

    prompt_ids: list[int]
    sampling: SamplingParams
    arrival_s: float  # engine clock (perf_counter) when the server received it
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: int | None = None  # the engine's id, set by the engine thread


class EngineWorker:
    def __init__(self, engine: Engine, metrics: ServerMetrics, loop: asyncio.AbstractEventLoop):
        self.engine, self.metrics, self.loop = engine, metrics, loop
        self._intake: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, Stream] = {}  # engine id -> stream, for requests not finished (engine thread only)
        self._stop = False
        self.submitted = 0  # written by the loop side only
        self.taken = 0  # written by the engine thread only
        self.thread = threading.Thread(target=self._run, name="kvbench-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: queued here, or waiting in the scheduler."""
        return self.submitted - self.taken + len(self.engine.scheduler.waiting)

    def submit(self, stream: Stream) -> None:
        self.submitted += 1
        self._command(("add", stream))

    def abort(self, stream: Stream, reason: str = "abort") -> None:
        """End a request: its client went away (`abort`), or its text reached a stop string (`stop`, as the
        metrics count it; the engine, which knows no stop strings, records an abort)."""
        self._command(("abort", (stream, reason)))

    def stop(self, abort: bool) -> None:
        """Stop the thread once in-flight requests finish (abort=True: abort them first)."""
        self._command(("stop", abort))

    def _command(self, command: tuple) -> None:
        self._intake.put(command)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._apply_commands()
            if self._stop and not self._streams:
                return
            if self.engine.has_work():
                self._step()
            else:
                self._wake.wait()
                self._wake.clear()

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._intake.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self.taken += 1
                if self._stop:  # arrived after shutdown began: end it at once
                    self._deliver([(arg, RequestOutput(-1, [], True, FinishReason.ABORT, 0, 0))])
                    continue
                try:
                    arg.request_id = self.engine.add_request(arg.prompt_ids, arg.sampling, arg.arrival_s)
                except KvbenchError as exc:  # the server checks requests first, so this is a bug there
                    self._deliver([(arg, EngineFailure(str(exc)))])
                    continue
                self._streams[arg.request_id] = arg
            elif kind == "abort" and arg[0].request_id in self._streams:
                self._abort(*arg)
            elif kind == "stop":
                self._stop = True
                if arg:
                    aborted = [(s, self._abort(s)) for s in list(self._streams.values())]
                    self._deliver(aborted)
        self._gauges()

    def _abort(self, stream: Stream, reason: str = "abort") -> RequestOutput:
        self.engine.abort(stream.request_id)
        del self._streams[stream.request_id]
        request = self.engine.requests[stream.request_id]
        self.metrics.on_finished(request, reason)
        return RequestOutput(request.request_id, [], True, FinishReason.ABORT, len(request.output_ids),
                             request.num_cached or 0)

    def _step(self) -> None:
        steps = len(self.engine.step_log)
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug in a step: fail what is in flight, keep the server up
            traceback.print_exc(file=sys.stderr)
            failure = EngineFailure(f"the engine failed: {type(exc).__name__}: {exc}")
            failed = [(s, failure) for s in self._streams.values()]
            for stream in list(self._streams.values()):
                self.engine.abort(stream.request_id)
                self.metrics.on_finished(self.engine.requests[stream.request_id])
            self._streams.clear()
            self._deliver(failed)
            return
        delivered = []
        for out in outputs:
            stream = self._streams[out.request_id]
            delivered.append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
                self.metrics.on_finished(self.engine.requests[out.request_id])
        if len(self.engine.step_log) > steps:  # a step that scheduled nothing logs nothing
            stats = self.engine.step_log[-1]
            self.metrics.on_step(stats.step_ms, len(outputs), stats.preempted)
        self._gauges()  # before the outputs: a client that saw its answer sees the metrics that include it
        self._deliver(delivered)

    def _gauges(self) -> None:
        scheduler = self.engine.scheduler
        self.metrics.on_state(len(scheduler.running), len(scheduler.waiting), self.engine.kv.pool.usage())

    def _deliver(self, items: list[tuple[Stream, object]]) -> None:
        if items:
            self.loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Stream, object]]) -> None:
    for stream, item in items:
        stream.outputs.put_nowait(item)
