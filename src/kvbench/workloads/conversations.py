"""A `.jsonl` path: conversations a user supplies, ShareGPT style (`{"conversations": [{"from": "human",
"value": ...}, ...]}`) or OpenAI style (`{"messages": [{"role": "user", ...}]}`); each request is a
conversation up to its first user message, cycled to the count asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from kvbench.errors import KvbenchError
from kvbench.workloads.request import Request
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
          "bing": "assistant", "bard": "assistant", "system": "system"}


def build(spec: WorkloadSpec, tok: Tokenizer | None, count: int) -> list[Request]:
    conversations = read_conversations(Path(spec.kind))
    return [Request(i, conversations[i % len(conversations)], spec.output_tokens) for i in range(count)]


def read_conversations(path: Path) -> list[tuple[dict, ...]]:
    """Each usable line of a conversations file, cut after its first user message."""
    try:
        lines = path.read_bytes().splitlines()  # bytes: a line that is not UTF-8 is reported by its number
    except OSError as exc:
        raise KvbenchError(f"cannot read workload file {path}: {exc.strerror or exc}") from None
    conversations = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            conversations.append(_first_request(json.loads(line.decode("utf-8"))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KvbenchError(f"{path} line {number}: not a conversation ({exc}); expected "
                               '{"conversations": [{"from": "human", "value": "..."}]} or '
                               '{"messages": [{"role": "user", "content": "..."}]}') from None
    if not conversations:
        raise KvbenchError(f"{path} holds no conversation")
    return conversations


def _first_request(row: dict) -> tuple[dict, ...]:
    if "messages" in row:
        turns = [(m["role"], m["content"]) for m in row["messages"]]
    else:
        turns = [(_ROLES.get(t["from"], t["from"]), t["value"]) for t in row["conversations"]]
    messages = []
    for role, content in turns:
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"unknown role {role!r} or non-text content")
        messages.append({"role": role, "content": content})
        if role == "user":
            return tuple(messages)
    raise ValueError("no user message")
