"""`kvbench serve`: the engine behind an OpenAI-compatible HTTP server.

Routes: `GET /v1/models`, `/health`, `/metrics` (Prometheus, vLLM's names), `POST /v1/completions` (a
prompt as text or token ids) and `/v1/chat/completions` (messages through the chat template), streamed
as one server-sent event per generated token or answered whole. The asyncio loop does HTTP, tokenization
and detokenization; the engine steps in its own thread (`kvbench.serve.worker`).

Errors are OpenAI-shaped: 400 for a bad field or a prompt that can never fit, 404 for another model, 503
when `max_waiting` requests already wait (or the server is shutting down). An error once streaming began
is an error event, then [DONE]. A client that disconnects aborts its request, which frees its blocks.
SIGINT / SIGTERM: stop taking requests, let those in flight finish, exit; a second signal aborts them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvbench.engine.sampling import SamplingConfig
from kvbench.errors import KvbenchError
from kvbench.serve.detok import Detokenizer, StopStrings
from kvbench.serve.engine import Engine
from kvbench.serve.metrics import CONTENT_TYPE, ServerMetrics
from kvbench.serve.openai import ApiRequest, Shapes, parse_request, usage
from kvbench.serve.request import FinishReason, RequestOutput, SamplingParams
from kvbench.serve.worker import EngineFailure, EngineWorker, Stream
from kvbench.sse_http import (STREAM_END, STREAM_HEAD, HttpRequest, chunk, error_body, peer_closed, send, send_json,
                              serve_connection, sse)

DISCONNECTED = object()  # put on a stream's queue when its client goes away


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    max_waiting: int | None = None  # 503 beyond this many requests not yet running; None: no limit

    def __post_init__(self):
        if self.max_waiting is not None and (not isinstance(self.max_waiting, int) or self.max_waiting < 0):
            raise KvbenchError(f"max_waiting must be a whole number >= 0, got {self.max_waiting!r}")


class Server:
    """`await Server(engine, config).start()`, then `await server.serve_until_stopped()` (or `stop()`)."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.lm = engine.lm
        self.metrics = ServerMetrics(config.served_model_name)
        self.worker: EngineWorker | None = None
        self.port = config.port
        self._server: asyncio.Server | None = None
        self._in_flight: set[Stream] = set()
        self._stopping: asyncio.Event | None = None
        self._signals = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.worker = EngineWorker(self.engine, self.metrics, loop)
        self.worker.start()
        try:
            self._server = await asyncio.start_server(lambda r, w: serve_connection(r, w, self.handle),
                                                      self.config.host, self.config.port)
        except OSError as exc:
            self.worker.stop(abort=True)
            raise KvbenchError(f"cannot listen on {self.config.host}:{self.config.port} ({exc.strerror}); "
                               "choose another --port or --host") from None
        self.port = self._server.sockets[0].getsockname()[1]

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> None:
        """Stop taking requests and let those in flight finish; called again, abort them."""
        self._signals += 1
        self._stopping.set()
        if self._signals > 1:
            self.worker.stop(abort=True)

    async def serve_until_stopped(self) -> None:
        await self._stopping.wait()
        self._server.close()  # no new connections; requests on open ones get 503
        self.worker.stop(abort=False)
        while self.worker.thread.is_alive():
            await asyncio.sleep(0.05)
        while self._in_flight:  # their last events are on the loop
            await asyncio.sleep(0.01)

    # routes

    async def handle(self, request: HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        route = (request.method, request.path)
        if route == ("GET", "/health"):
            return await send(writer, 200, "text/plain", b"")
        if route == ("GET", "/v1/models"):
            card = {"id": self.config.served_model_name, "object": "model", "created": 0, "owned_by": "kvbench",
                    "max_model_len": self.engine.kv.max_model_len}
            return await send_json(writer, 200, {"object": "list", "data": [card]})
        if route == ("GET", "/metrics"):
            return await send(writer, 200, CONTENT_TYPE, self.metrics.render())
        if request.path in ("/v1/completions", "/v1/chat/completions"):
            if request.method != "POST":
                return await send_json(writer, 405, error_body(f"{request.path} takes POST", 405))
            return await self._generate(request, reader, writer, chat=request.path.endswith("chat/completions"))
        return await send_json(writer, 404, error_body(f"no route {request.method} {request.path}", 404))

    async def _generate(self, request: HttpRequest, reader, writer, chat: bool) -> bool:
        try:
            api = parse_request(request.json(), chat)
            if api.model != self.config.served_model_name:
                return await send_json(writer, 404, error_body(
                    f"model {api.model!r} does not exist; this server serves {self.config.served_model_name!r}", 404))
            prompt_ids = self._prompt_ids(api)
            sampling = SamplingParams(api.max_tokens, SamplingConfig(
                api.temperature, api.top_k, api.top_p, time.time_ns() % 2**31 if api.seed is None else api.seed),
                api.ignore_eos)
            self.engine.check_request(prompt_ids, sampling)
        except KvbenchError as exc:
            return await send_json(writer, 400, error_body(str(exc), 400))
        if self._stopping.is_set():
            return await send_json(writer, 503, error_body("the server is shutting down", 503))
        limit = self.config.max_waiting
        if limit is not None and self.worker.num_waiting >= limit:
            return await send_json(writer, 503, error_body(
                f"{self.worker.num_waiting} requests are waiting (max_waiting {limit}); retry later", 503))
        stream = Stream(prompt_ids, sampling, time.perf_counter())
        self._in_flight.add(stream)
        watch = asyncio.ensure_future(_watch(reader, stream))
        answered = False
        try:
            self.worker.submit(stream)
            shapes = Shapes(chat, api.model)
            respond = self._stream if api.stream else self._whole
            keep = await respond(stream, api, shapes, writer)
            answered = True
            return keep
        except (ConnectionError, Disconnected):
            return False
        finally:
            if not answered:  # the client went away, or this side failed: nobody reads the rest
                self.worker.abort(stream)
            watch.cancel()  # and wait for it: its read must end before the connection reads the next request
            await asyncio.gather(watch, return_exceptions=True)
            self._in_flight.discard(stream)

    def _prompt_ids(self, api: ApiRequest) -> list[int]:
        if api.prompt_ids is not None:
            return list(api.prompt_ids)
        if self.lm.tokenizer is None:
            raise KvbenchError(f"model {self.lm.name!r} has no tokenizer; send the prompt as token ids to /v1/completions")
        if api.prompt_text is not None:
            return self.lm.encode(api.prompt_text, chat=False)
        try:
            ids = self.lm.tokenizer.apply_chat_template(list(api.messages), add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template may refuse a conversation (jinja's raise_exception)
            raise KvbenchError(f"the chat template of {self.lm.name!r} refused the messages: {exc}") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    async def _stream(self, stream: Stream, api: ApiRequest, shapes: Shapes, writer) -> bool:
        writer.write(STREAM_HEAD + (chunk(sse(shapes.role_chunk())) if api.chat else b""))
        counts = None
        try:
            async for text, finish, counts in self._pieces(stream, api):
                writer.write(chunk(sse(shapes.chunk(text, finish))))
                await writer.drain()
        except EngineFailure as exc:
            writer.write(chunk(sse(error_body(str(exc), exc.status))) + STREAM_END)
            await writer.drain()
            return True
        if api.include_usage:
            writer.write(chunk(sse(shapes.usage_chunk(usage(*counts)))))
        writer.write(STREAM_END)
        await writer.drain()
        return True

    async def _whole(self, stream: Stream, api: ApiRequest, shapes: Shapes, writer) -> bool:
        texts, finish, counts = [], None, None
        try:
            async for text, finish, counts in self._pieces(stream, api):
                texts.append(text)
        except EngineFailure as exc:
            return await send_json(writer, exc.status, error_body(str(exc), exc.status))
        return await send_json(writer, 200, shapes.completion("".join(texts), finish, usage(*counts)))

    async def _pieces(self, stream: Stream, api: ApiRequest) -> AsyncIterator[tuple[str, str | None, tuple]]:
        """(text, finish_reason on the last, (prompt, completion, cached tokens)) per generated token."""
        detok, stops = Detokenizer(self.lm.tokenizer, stream.prompt_ids), StopStrings(api.stop)
        generated = 0
        while True:
            item = await stream.outputs.get()
            if item is DISCONNECTED:
                raise Disconnected
            if isinstance(item, EngineFailure):
                raise item
            out: RequestOutput = item
            if out.finish_reason is FinishReason.ABORT:
                raise EngineFailure("the server shut down before the request finished", status=503)
            for i, token in enumerate(out.new_token_ids):
                generated += 1
                text, stopped = stops.feed(detok.push(token))
                last = out.finished and i == len(out.new_token_ids) - 1
                if last and not stopped:  # the end releases text the detokenizer still holds back
                    held, stopped = stops.feed(detok.flush())
                    text += held
                counts = (len(stream.prompt_ids), generated, out.num_cached_tokens)
                if stopped or last:
                    finish = "stop" if stopped else out.finish_reason.value
                    if out.finished:  # counted before the client sees its end, with the reason it sees
                        self.worker.finished(stream, finish)
                    else:  # a stop string: the engine thread ends it and counts it as "stop"
                        self.worker.abort(stream, "stop")
                    yield text if stopped else text + stops.flush(), finish, counts
                    return
                yield text, None, counts


class Disconnected(Exception):
    """The client closed the connection before its answer ended."""


async def _watch(reader: asyncio.StreamReader, stream: Stream) -> None:
    try:
        await peer_closed(reader)
    except ConnectionError:
        pass
    stream.outputs.put_nowait(DISCONNECTED)
