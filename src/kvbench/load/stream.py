"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Its timing fields come from `bench.metrics.request_timing` (defined in docs/metrics.md), from the
actual send, the arrival of each SSE chunk that carries generated text (a role-only chunk does not
count; a chunk may carry several tokens) and the end of the stream.

Token counts come from the server's `usage` (asked for with `stream_options.include_usage`,
`usage_source` "server"). A server that reports none (llama-cpp-python) gets client counts
(`usage_source` "client"): the prompt through the local tokenizer when one is given (a chat request
through its chat template), and the output by `count_output_tokens`; `output_tokens_by` says which
method produced the output count.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from kvbench.bench.metrics import request_timing
from kvbench.workloads import Request, Tokenizer

ENDPOINTS = ("completions", "chat")


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    model: str
    kind: str = "completions"  # or "chat"
    timeout_s: float = 600.0  # per connect / read of one chunk
    ignore_eos: bool = False  # vLLM and SGLang honour it; others ignore it

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/{'chat/completions' if self.kind == 'chat' else 'completions'}"

    def payload(self, request: Request) -> dict:
        body = {"model": self.model, "max_tokens": request.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.kind == "chat":
            body["messages"] = list(request.messages)
        else:
            body["prompt"] = request.prompt
        return body


@dataclass
class Trace:
    """What one request measured so far; turned into a record however the request ends."""

    request: Request
    scheduled_s: float  # from the start of the run
    t0: float  # perf_counter() at the start of the run
    sent: float | None = None  # perf_counter() values from here on
    chunks: list[float] = field(default_factory=list)  # arrival of each text-bearing chunk
    pieces: list[str] = field(default_factory=list)  # the text of each of those chunks
    end: float | None = None
    usage: dict | None = None
    status: str = "pending"
    error: str | None = None

    def fail(self, status: str, error: str) -> None:
        if self.status in ("pending", "ok"):
            self.status, self.error = status, error[:500]
        self.end = self.end or time.perf_counter()

    def record(self, tokenizer: Tokenizer | None = None, chat: bool = False) -> dict:
        """The results.jsonl record; times relative to the run start, durations in ms."""
        prompt_tokens, output_tokens, cached, source, counted_by = self._token_counts(tokenizer, chat)
        timing = request_timing(self.chunks, start_s=self.sent, end_s=self.end, output_tokens=output_tokens,
                                scheduled_s=self.t0 + self.scheduled_s)
        req = self.request
        return {
            "index": req.index, "scheduled_s": self.scheduled_s,
            "sent_s": None if self.sent is None else self.sent - self.t0,
            "end_s": None if self.end is None else self.end - self.t0,
            **vars(timing),
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "cached_tokens": cached,
            "usage_source": source, "output_tokens_by": counted_by, "status": self.status, "error": self.error,
            "prefix_id": req.prefix_id, "shared_prefix": req.shared_prefix, "turn": req.turn,
        }

    def _token_counts(self, tokenizer: Tokenizer | None, chat: bool) -> tuple[int | None, int, int | None, str, str]:
        if self.usage:
            details = self.usage.get("prompt_tokens_details") or {}
            return (self.usage.get("prompt_tokens"), int(self.usage.get("completion_tokens") or 0),
                    details.get("cached_tokens"), "server", "server")
        prompt = _prompt_tokens(self.request, tokenizer, chat) if tokenizer else None
        output, counted_by = count_output_tokens(self.pieces, tokenizer)
        return prompt, output, None, "client", counted_by


def count_output_tokens(pieces: list[str], tokenizer: Tokenizer | None) -> tuple[int, str]:
    """Output tokens of a stream without server usage, from the text of its chunks, and how they were counted.

    One token per chunk undercounts multi-byte text: llama-cpp-python holds back the tokens of a partial
    UTF-8 character and sends them in one chunk (an emoji: 3 tokens, 1 chunk). Re-tokenizing the whole
    text undercounts too: tokens merge across chunk boundaries (AIPerf counts 31.38 for 32). So with a
    tokenizer each chunk is re-tokenized on its own and counts the larger of 1 and its token count
    ("tokenizer"); without one, each chunk counts 1 ("chunks").
    """
    if tokenizer is None:
        return len(pieces), "chunks"
    return sum(max(1, len(tokenizer.encode(piece, add_special_tokens=False))) for piece in pieces), "tokenizer"


def _prompt_tokens(request: Request, tokenizer: Tokenizer, chat: bool) -> int:
    """The prompt as the server tokenizes it: a chat request's messages go through the chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=True)
            return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # newer transformers: a BatchEncoding
        except Exception:  # a template may reject a conversation (jinja's raise_exception): count the text
            pass
    return len(tokenizer.encode(request.prompt, add_special_tokens=False))


async def stream_request(client: httpx.AsyncClient, endpoint: Endpoint, trace: Trace) -> None:
    """Send one request and fill `trace`; failures end up in trace.status, never as exceptions."""
    try:
        trace.sent = time.perf_counter()
        async with client.stream("POST", endpoint.url, json=endpoint.payload(trace.request)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                trace.fail(f"http_{response.status_code}", body)
                return
            if "text/event-stream" not in response.headers.get("content-type", ""):
                trace.fail("not_streaming", f"content-type {response.headers.get('content-type')!r}")
                return
            done = await _read_events(response, trace)
        trace.end = time.perf_counter()
        if trace.status != "pending":
            return
        if not trace.chunks:
            trace.fail("no_output", "the stream ended without generated text")
        elif not done:
            trace.fail("incomplete_stream", "the stream ended without [DONE] or a finish_reason")
        else:
            trace.status = "ok"
    except httpx.TimeoutException as exc:
        trace.fail("timeout", f"{type(exc).__name__}: no data for {endpoint.timeout_s:g} s")
    except httpx.ConnectError as exc:
        trace.fail("connect_error", str(exc) or type(exc).__name__)
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        trace.fail("connection_dropped", str(exc) or type(exc).__name__)
    except httpx.HTTPError as exc:
        trace.fail("http_error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a client bug fails this request, not the whole run
        trace.fail(f"client_error: {type(exc).__name__}", str(exc) or type(exc).__name__)


async def _read_events(response: httpx.Response, trace: Trace) -> bool:
    """Read SSE `data:` lines to the end of the body (so the connection is kept alive for reuse);
    True when the stream ended properly ([DONE] or a finish_reason)."""
    finished = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping") and other SSE fields
        data = line[5:].strip()
        if data == "[DONE]":
            finished = True
            continue
        now = time.perf_counter()
        try:
            event = _event(data)
        except ValueError as exc:
            trace.fail("malformed_sse", f"{exc}: {data[:200]!r}")
            return False
        error = _error_message(event)
        if error is not None:
            trace.fail("server_error", error)
            continue  # read on to [DONE], so the connection is kept
        if event.get("usage"):
            trace.usage = event["usage"]
        for choice in event.get("choices") or []:
            piece = _text_of(choice)
            if piece:
                trace.chunks.append(now)
                trace.pieces.append(piece)
            finished = finished or bool(choice.get("finish_reason"))
    return finished


def _event(data: str) -> dict:
    """A data line as a chunk object whose choices, deltas and usage have the expected types."""
    try:
        event = json.loads(data)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    choices = event.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) and isinstance(c.get("delta") or {}, dict)
                                                for c in choices):
        raise ValueError("choices are not a list of objects with object deltas")
    if not isinstance(event.get("usage") or {}, dict):
        raise ValueError("usage is not an object")
    return event


def _error_message(event: dict) -> str | None:
    """The message of an error event: vLLM and SGLang send `{"error": {...}}` (older vLLM an object with
    `"object": "error"`), then [DONE], when generation fails mid-stream."""
    error = event if event.get("object") == "error" else event.get("error")
    if not error:
        return None
    return str(error.get("message") or error) if isinstance(error, dict) else str(error)


def _text_of(choice: dict) -> str:
    if "delta" in choice:
        delta = choice["delta"] or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


POOL_SHARD = 32  # connections one client is expected to hold open


def http_clients(max_in_flight: int, timeout_s: float) -> list[httpx.AsyncClient]:
    """Clients that together never cap concurrency: each may open `max_in_flight` connections, so
    none ever queues a request, and requests are spread round-robin over enough of them that each
    pool stays near POOL_SHARD connections. httpcore scans its whole pool on every request event:
    with one pool of ~500 connections that scan took most of the client's CPU (profiled)."""
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    count = max(1, math.ceil(max_in_flight / POOL_SHARD))
    tls = httpx.create_ssl_context()  # one for all: building one takes ~15 ms of CPU (profiled: 125 of them, 2 s)
    return [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), verify=tls) for _ in range(count)]
