"""A small HTTP/1.1 server for OpenAI-style APIs over asyncio streams: keep-alive connections, bodies
read by Content-Length, responses with a length or as server-sent events in chunked transfer encoding.

Two users: `kvbench serve` and the fake server the load client's tests run against
(`kvbench.load.fake`). One request at a time per connection, as HTTP clients send them (no
pipelining). Torch-free: the load client's install imports it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MAX_HEADER_LINES = 100
MAX_BODY_BYTES = 64 * 2**20
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"


class BadRequest(Exception):
    """A request the server cannot read; answered with a 400 (or `status`) and the connection closed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    body: bytes
    keep_alive: bool = True

    def json(self) -> object:
        try:
            return json.loads(self.body) if self.body else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not JSON ({exc})") from None


# handle(request, reader, writer) -> False when the handler closed the connection itself
Handler = Callable[[HttpRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """The next request on the connection; None when the client closed it."""
    line = await reader.readline()
    if not line:
        return None
    try:
        method, path, version = line.decode("latin-1").split()
    except ValueError:
        raise BadRequest(f"cannot read the request line {line[:100]!r}") from None
    headers = {}
    for _ in range(MAX_HEADER_LINES):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise BadRequest(f"more than {MAX_HEADER_LINES} header lines")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise BadRequest("a chunked request body is not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", 0))
    except ValueError:
        raise BadRequest(f"Content-Length {headers['content-length']!r} is not a number") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise BadRequest(f"a body of {length} bytes is over the limit of {MAX_BODY_BYTES}", status=413)
    body = await reader.readexactly(length) if length else b""
    close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
    return HttpRequest(method, path.partition("?")[0], body, keep_alive=not close)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler) -> None:
    """Answer requests on one connection until the client closes it (or a handler drops it)."""
    try:
        while True:
            request = None
            try:
                request = await read_request(reader)
                if request is None or not await handle(request, reader, writer):
                    return
            except BadRequest as exc:  # raised before the handler wrote anything
                await send_json(writer, exc.status, error_body(str(exc), exc.status))
                if request is None:
                    return  # the request could not be read, so where the next one starts is unknown
            if not request.keep_alive:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def peer_closed(reader: asyncio.StreamReader) -> None:
    """Return when the client closes the connection (it sends nothing else while waiting for a response)."""
    while await reader.read(4096):
        pass  # a client that sends more before our answer ends is not one we serve; read on to its close


def error_body(message: str, status: int, kind: str | None = None) -> dict:
    """An OpenAI-shaped error (`{"error": {"message", "type", "param", "code"}}`)."""
    kind = kind or {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(
        status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse(obj: dict) -> bytes:
    """A server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


STREAM_END = chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"  # [DONE], then the last chunk


async def send_json(writer: asyncio.StreamWriter, status: int, obj: dict) -> bool:
    return await send(writer, status, "application/json", json.dumps(obj).encode())


async def send(writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes) -> bool:
    writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    return True
