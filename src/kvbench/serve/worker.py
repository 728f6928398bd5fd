"""The engine in its own thread, fed by the server's asyncio loop.

The loop side calls `submit` and `abort` (they only queue a command and wake the thread). The thread
runs every engine call: it applies the queued commands, steps while there is work, and hands each
step's outputs back to the loop in one `call_soon_threadsafe`, where each request's `Stream` queue
receives its own. torch releases the GIL inside its ops, so the loop keeps serving during a step.

The engine forgets a request once its end is handed to the loop, so a long-running server holds only
the requests in flight. Each request's end is counted in the metrics once: by the loop when it reads the
final output of a request the engine finished (with the finish reason the client gets), else by the thread
when it aborts the request. An engine call that raises fails only the requests it concerned (500).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field

from kvbench.serve.engine import Engine
from kvbench.serve.metrics import ServerMetrics
from kvbench.serve.request import FinishReason, Request, RequestOutput, SamplingParams


class EngineFailure(Exception):
    """Why a request ended without finishing: an engine call raised (500; the engine keeps serving new requests),
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
    request: Request | None = None  # the engine's request (set with the id), kept once the engine forgets it
    counted: bool = False  # its end is in the metrics (see `EngineWorker._count`)


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
                self._guarded([arg], self._add, arg)
            elif kind == "abort":
                self._guarded([arg[0]], self._abort, *arg)
            elif kind == "stop":
                self._stop = True
                if arg:
                    self._guarded(list(self._streams.values()), self._abort_all)
        self._guarded([], self._gauges)

    def _guarded(self, streams: list[Stream], command, *args) -> None:
        try:
            command(*args)
        except Exception as exc:  # a bug in an engine call: fail the requests it concerned, keep the thread up
            self._fail(streams, exc)

    def _add(self, stream: Stream) -> None:
        if self._stop:  # arrived after shutdown began: end it at once
            self._deliver([(stream, RequestOutput(-1, [], True, FinishReason.ABORT, 0, 0))])
            return
        stream.request_id = self.engine.add_request(stream.prompt_ids, stream.sampling, stream.arrival_s)
        stream.request = self.engine.requests[stream.request_id]
        self._streams[stream.request_id] = stream

    def _abort(self, stream: Stream, reason: str) -> None:
        if stream.request_id in self._streams:  # the engine still runs it
            self._end(stream, reason)
            del self._streams[stream.request_id]
        elif stream.request is not None:  # the engine finished it; the loop stopped reading before its end
            self._count(stream, reason)

    def _abort_all(self) -> None:
        for stream in list(self._streams.values()):
            self._deliver([(stream, self._end(stream))])
            del self._streams[stream.request_id]

    def _end(self, stream: Stream, reason: str = "abort") -> RequestOutput:
        """Abort a request the engine runs, count it, and forget it; the output that tells its stream."""
        self.engine.abort(stream.request_id)
        self._count(stream, reason)
        self.engine.forget(stream.request_id)
        request = stream.request
        return RequestOutput(request.request_id, [], True, FinishReason.ABORT, len(request.output_ids),
                             request.num_cached or 0)

    def finished(self, stream: Stream, reason: str) -> None:
        """Loop side, on reading the final output of a request the engine finished: count it as the client got
        it (`stop` where a stop string matched its last token, which the engine finished for `length`)."""
        self._count(stream, reason)

    def _count(self, stream: Stream, reason: str) -> None:
        if not stream.counted:  # once, by the thread that ends the stream's life (the other never sees it end)
            stream.counted = True
            self.metrics.on_finished(stream.request, reason)

    def _fail(self, streams: list[Stream], exc: Exception) -> None:
        """Log the traceback, end `streams`' requests where the engine still can, and answer them with a 500."""
        traceback.print_exc(file=sys.stderr)
        failure = EngineFailure(f"the engine failed: {type(exc).__name__}: {exc}")
        for stream in streams:
            if self._streams.pop(stream.request_id, None) is not None:
                try:
                    self._end(stream)
                except Exception:  # not even an abort works: the client is answered all the same
                    traceback.print_exc(file=sys.stderr)
        self._deliver([(stream, failure) for stream in streams])

    def _step(self) -> None:
        steps = self.engine.num_steps
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug in a step: fail what is in flight, keep the server up
            self._fail(list(self._streams.values()), exc)
            return
        delivered = []
        for out in outputs:
            stream = self._streams[out.request_id]
            delivered.append((stream, out))
            if out.finished:  # the loop counts it when it reads this output (`finished`)
                del self._streams[out.request_id]
                self.engine.forget(out.request_id)
        if self.engine.num_steps > steps:  # a step that scheduled nothing logs nothing
            stats = self.engine.step_log[-1]
            self.metrics.on_step(stats.step_ms, len(outputs), stats.preempted)
        self._guarded([], self._gauges)  # before the outputs: a client that saw its answer sees them
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
