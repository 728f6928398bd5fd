"""A tiny OpenAI-compatible streaming server for tests and the client benchmark (no model inside).

It answers GET /v1/models and /metrics, and POST /v1/completions and /v1/chat/completions with
`max_tokens` tokens, `FakeConfig.tokens` in turn (default " tok"), as server-sent events (HTTP/1.1
chunked, keep-alive), then a usage chunk when `stream_options.include_usage` asks for one. Tokens are
bytes; as llama-cpp-python does, a token that ends inside a UTF-8 character is held back and sent
with the tokens that complete it, in one chunk, and an event with a multi-byte character is written
as two HTTP chunks split inside that character. Prompt token counts are words. A marker
`[[fault:NAME]]` in a prompt injects a fault into that request:

- `slow_first`: the first text chunk comes `slow_first_s` late (the role chunk of chat comes at once);
- `http_500`: a 500 answer; `malformed`: a data line that is not JSON after the first token;
- `bad_choices`, `bad_choice`, `bad_delta`, `bad_usage`: after the first token, valid JSON of the
  wrong shape (choices not a list, a choice or a delta not an object, usage not an object);
- `error`: after the first token, an error event (`{"error": {...}}`) then [DONE], as vLLM and SGLang
  send when generation fails mid-stream; `error_first`: the same before any token, in older vLLM's
  form (`{"object": "error", ...}`);
- `drop`: the connection is closed mid-stream; `stall`: silence for `stall_s` after the first token;
- `no_usage`: no usage chunk.
`streaming=False` makes the whole server answer with plain JSON (a server that cannot stream).
Run it alone with `python -m kvbench.load.fake --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import re
import threading
from dataclasses import dataclass

from kvbench.sse_http import STREAM_END, STREAM_HEAD, HttpRequest, chunk, send, send_json, serve_connection, sse

FAULT = re.compile(r"\[\[fault:(\w+)\]\]")
LEAD_BYTE = re.compile(rb"[\xc0-\xff]")  # the first byte of a multi-byte UTF-8 character
BAD_LINES = {  # fault -> the data line sent in place of the second token
    "malformed": b"data: {not json\n\n",
    "bad_choices": b'data: {"choices": "oops"}\n\n',
    "bad_choice": b'data: {"choices": ["oops"]}\n\n',
    "bad_delta": b'data: {"choices": [{"index": 0, "delta": "oops"}]}\n\n',
    "bad_usage": b'data: {"choices": [], "usage": "oops"}\n\n',
}
ERRORS = {  # fault -> (the token it replaces, the event)
    "error": (1, {"error": {"message": "injected mid-stream error", "type": "InternalServerError", "code": 500}}),
    "error_first": (0, {"object": "error", "message": "injected error before any token", "type": "BadRequestError",
                        "code": 400}),
}


@dataclass
class FakeConfig:
    model: str = "fake-model"
    token_delay_s: float = 0.0
    slow_first_s: float = 0.3
    stall_s: float = 3.0
    streaming: bool = True
    tokens: tuple[bytes, ...] = (b" tok",)  # generated in turn; a multi-byte character may span tokens


class FakeServer:
    """`with FakeServer() as url:` serves on 127.0.0.1 at a free port from a background thread."""

    def __init__(self, config: FakeConfig | None = None, port: int = 0):
        self.config = config or FakeConfig()
        self.port = port
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}
        self._last_prompt: list[str] = []
        self.prompts: list[str] = []  # every prompt received, in order of arrival
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self) -> None:
        self._server = await asyncio.start_server(lambda r, w: serve_connection(r, w, self._handle), "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> str:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.serve())
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake server did not start")
        return self.url

    def __exit__(self, *exc) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, request: HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return await self._route(request.method, request.path, request.json(), writer)

    async def _route(self, method: str, path: str, body: dict, writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path == "/v1/models":
            return await send_json(writer, 200, {"object": "list", "data": [{"id": self.config.model, "object": "model"}]})
        if method == "GET" and path == "/metrics":
            return await send(writer, 200, "text/plain; version=0.0.4", self._metrics().encode())
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            if body.get("model") != self.config.model:
                return await send_json(writer, 404, {"error": {"message": f"model {body.get('model')!r} not found"}})
            return await self._generate(body, chat=path.endswith("chat/completions"), writer=writer)
        return await send_json(writer, 404, {"error": {"message": f"no route {method} {path}"}})

    def _metrics(self) -> str:
        c = self.counters
        return ("# TYPE vllm:prefix_cache_queries counter\n"
                f'vllm:prefix_cache_queries_total{{model_name="{self.config.model}"}} {c["prompt_tokens"]}\n'
                "# TYPE vllm:prefix_cache_hits counter\n"
                f'vllm:prefix_cache_hits_total{{model_name="{self.config.model}"}} {c["cached_tokens"]}\n'
                "# TYPE vllm:request_success counter\n"
                f'vllm:request_success_total{{model_name="{self.config.model}",finished_reason="length"}} {c["requests"]}\n'
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f'vllm:kv_cache_usage_perc{{model_name="{self.config.model}"}} 0.25\n')

    async def _generate(self, body: dict, chat: bool, writer: asyncio.StreamWriter) -> bool:
        prompt = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        self.prompts.append(prompt)
        fault = (FAULT.search(prompt) or [None, None])[1]
        if fault == "http_500":
            return await send_json(writer, 500, {"error": {"message": "injected failure"}})
        words = prompt.split()
        cached = _common_prefix(words, self._last_prompt)
        self._last_prompt = words
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(words)
        self.counters["cached_tokens"] += cached
        n = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": len(words), "completion_tokens": n, "total_tokens": len(words) + n,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        kind = "chat.completion.chunk" if chat else "text_completion"
        tokens = [self.config.tokens[i % len(self.config.tokens)] for i in range(n)]
        if not self.config.streaming or not body.get("stream"):
            text = b"".join(tokens).decode("utf-8", "ignore")
            choice = {"index": 0, "finish_reason": "length",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return await send_json(writer, 200, {"object": kind.removesuffix(".chunk"), "choices": [choice], "usage": usage})

        def event(piece: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish}
            return sse({"object": kind, "model": self.config.model, "choices": [choice]})

        writer.write(STREAM_HEAD)
        if chat:
            writer.write(chunk(event(None, role=True)))
        await writer.drain()
        held = codecs.getincrementaldecoder("utf-8")()  # holds back a partial character
        for i in range(n):
            delay = self.config.slow_first_s if (i == 0 and fault == "slow_first") else self.config.token_delay_s
            if fault == "stall" and i == 1:
                delay = self.config.stall_s
            if delay:
                await asyncio.sleep(delay)
            if fault == "drop" and i == min(2, n - 1):
                writer.transport.abort()
                return False
            if fault in ERRORS and i == ERRORS[fault][0]:
                writer.write(chunk(sse(ERRORS[fault][1])) + STREAM_END)
                await writer.drain()
                return True
            if fault in BAD_LINES and i == 1:
                writer.write(chunk(BAD_LINES[fault]))
            elif piece := held.decode(tokens[i]):
                await _write_split(writer, event(piece))
            await writer.drain()
        writer.write(chunk(event(None, finish="length")))
        if (body.get("stream_options") or {}).get("include_usage") and fault != "no_usage":
            writer.write(chunk(sse({"object": kind, "model": self.config.model, "choices": [], "usage": usage})))
        writer.write(STREAM_END)
        await writer.drain()
        return True


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def _write_split(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write `data` as two HTTP chunks split after the lead byte of its first multi-byte character (if any),
    so a client sees a character cut between reads."""
    lead = LEAD_BYTE.search(data)
    cut = lead.end() if lead else len(data)
    writer.write(chunk(data[:cut]))
    if cut < len(data):
        await writer.drain()
        writer.write(chunk(data[cut:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeServer(FakeConfig(token_delay_s=args.token_delay), port=args.port)

    async def forever() -> None:
        await server.serve()
        print(f"fake server on {server.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(forever())


if __name__ == "__main__":
    main()
