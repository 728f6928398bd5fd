"""The OpenAI API's request and response shapes for `/v1/completions` and `/v1/chat/completions`.

`parse_request` checks a body field by field and says which field is wrong; a field kvbench does not
implement is refused by name unless it holds its no-op value (`n: 1`, `logprobs: null`, ...), so a client
never gets a silently different generation. `Shapes` builds the response objects.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

from kvbench.errors import KvbenchError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; kvbench uses it for chat too
# fields accepted only with their no-op value (anything goes for `user`)
NO_OP = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "presence_penalty": 0,
         "frequency_penalty": 0, "repetition_penalty": 1, "min_tokens": 0, "suffix": None, "logit_bias": None,
         "user": ..., "parallel_tool_calls": ..., "tools": None, "tool_choice": None, "response_format": None}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stream",
          "stream_options"}
FIELDS = {False: COMMON | {"prompt"}, True: COMMON | {"messages", "max_completion_tokens"}}


@dataclass(frozen=True)
class ApiRequest:
    """A validated body. Exactly one of `prompt_text`, `prompt_ids`, `messages` is set."""

    chat: bool
    model: str
    prompt_text: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False


def parse_request(body: object, chat: bool) -> ApiRequest:
    """`body` as an `ApiRequest`; a KvbenchError naming the field when it is not one."""
    if not isinstance(body, dict):
        raise KvbenchError("the body must be a JSON object")
    for name, value in body.items():
        if name in FIELDS[chat]:
            continue
        if name not in NO_OP:
            raise KvbenchError(f"field {name!r} is not supported; accepted: {', '.join(sorted(FIELDS[chat]))}")
        if NO_OP[name] is not ... and value != NO_OP[name]:
            raise KvbenchError(f"{name}={value!r} is not supported; only {NO_OP[name]!r} (or leave it out)")
    model = _get(body, "model", str, required=True)
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      int, DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise KvbenchError(f"max_tokens must be at least 1, got {max_tokens}")
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not (math.isfinite(temperature) and temperature >= 0):
        raise KvbenchError(f"temperature must be a finite number >= 0, got {temperature}")
    top_k = _get(body, "top_k", int, 0)
    if top_k < -1:
        raise KvbenchError(f"top_k must be -1 or 0 (no limit) or positive, got {top_k}")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise KvbenchError("stop must be a non-empty string or a list of them")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise KvbenchError("stream_options takes only include_usage")
    common = dict(
        chat=chat, model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
        seed=_get(body, "seed", int, None), stop=tuple(stop), ignore_eos=_get(body, "ignore_eos", bool, False),
        stream=_get(body, "stream", bool, False),
        include_usage=_get(options or {}, "include_usage", bool, False, "stream_options.include_usage"))
    if chat:
        return ApiRequest(**common, messages=_messages(body.get("messages")))
    return ApiRequest(**common, **_prompt(body.get("prompt")))


def _get(body: dict, name: str, kind, default=None, label: str | None = None, required: bool = False):
    value = body.get(name)
    if value is None:
        if required:
            raise KvbenchError(f"field {name!r} is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kinds)
        raise KvbenchError(f"{label or name} must be {names}, got {type(value).__name__} {value!r:.50}")
    return value


def _prompt(prompt: object) -> dict:
    """A string or a list of token ids; a batch of one of either is taken as that one."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return {"prompt_text": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_ids": tuple(prompt)}
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise KvbenchError(f"a batch of {len(prompt)} prompts is not supported; send one prompt per request")
    raise KvbenchError("prompt must be a non-empty string or a non-empty list of token ids")


def _messages(messages: object) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise KvbenchError("messages must be a non-empty list of {role, content} objects")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise KvbenchError("each message must be an object with a string role and a string content")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


class Shapes:
    """The response objects of one request (one id and creation time for all its chunks)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        return {**self._head("text_completion"), "choices": [{"index": 0, "text": text, "logprobs": None,
                                                              "finish_reason": finish_reason}]}

    def role_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}

    def completion(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(self.kind), "choices": [choice], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
