"""What a load run sends: the same kinds of prompts as the in-process harness, as text for a server.

- `random`: seeded random token ids of a fixed length (`bench.workloads.synthetic_prompt`), decoded
  to text with the served model's tokenizer; the server's own count is recorded as the truth.
- `prefix-repetition`: N shared prefixes x M distinct suffixes (corpus slices), sent prefix by
  prefix, to measure a server's prefix cache: every request after the first of its prefix is
  marked `shared_prefix`.
- `multi-turn`: C conversations of T turns, sent round by round; turn k carries the whole history
  (earlier user turns and fixed assistant replies), so its prompt extends turn k-1's.
- `reuse:<workload>`: a sequence of the reuse suite's (`kvbench.bench.reuse_workloads`): a system
  prompt, a RAG document as a prefix or after varying preambles (`reuse:rag-interior-2000`), a
  growing chat, code context or few-shot examples, each re-sent with a new question; a request is
  `shared_prefix` when it begins as an earlier one does (not rag-interior's: its preambles differ).
- a `.jsonl` path: conversations a user supplies, ShareGPT style (`{"conversations": [{"from":
  "human", "value": ...}, ...]}`) or OpenAI style (`{"messages": [{"role": "user", ...}]}`); each
  request is a conversation up to its first user message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvbench.bench.corpus import corpus_text
from kvbench.bench.reuse_workloads import Texts, check_workload
from kvbench.bench.reuse_workloads import build as build_reuse_sequence
from kvbench.bench.workloads import corpus_slice, synthetic_prompt
from kvbench.errors import KvbenchError

KINDS = ("random", "prefix-repetition", "multi-turn")
SHARED_PREFIX_TOKENS = 16  # vLLM's default KV block: a shorter common prefix is no prefix-cache hit there
_UNKNOWN_LENGTH = 10**9  # transformers' model_max_length when a tokenizer does not know its model's context
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
          "bing": "assistant", "bard": "assistant", "system": "system"}


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class LoadWorkload:
    kind: str = "random"  # one of KINDS, or a path to a .jsonl file of conversations
    prompt_tokens: int = 128  # random prompts, suffixes and user turns
    output_tokens: int = 64  # max_tokens of every request
    prefix_tokens: int = 512  # prefix-repetition
    prefixes: int = 4  # N
    suffixes: int = 4  # M per prefix
    conversations: int = 4  # multi-turn
    turns: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.kind.startswith("reuse:"):
            check_workload(self.kind.removeprefix("reuse:"))
        elif self.kind not in KINDS and not self.kind.endswith(".jsonl"):
            raise KvbenchError(f"unknown workload {self.kind!r}; valid: {', '.join(KINDS)}, reuse:<reuse workload> "
                               "(reuse:rag-prefix-2000), or a path to a .jsonl file")
        for name in ("prompt_tokens", "output_tokens", "prefix_tokens", "prefixes", "suffixes", "conversations", "turns"):
            if getattr(self, name) < 1:
                raise KvbenchError(f"workload {name} must be >= 1, got {getattr(self, name)}")

    @property
    def needs_tokenizer(self) -> bool:
        return self.kind in KINDS or self.kind.startswith("reuse:")

    @property
    def natural_count(self) -> int | None:
        """Requests in one pass over the workload (None: the random workload has no end)."""
        if self.kind == "prefix-repetition":
            return self.prefixes * self.suffixes
        if self.kind == "multi-turn":
            return self.conversations * self.turns
        if self.kind.endswith(".jsonl"):
            return len(read_conversations(Path(self.kind)))
        return None


@dataclass(frozen=True)
class Request:
    index: int
    messages: tuple[dict, ...]  # the chat form
    max_tokens: int
    prefix_id: int | None = None
    shared_prefix: bool = False  # an earlier request of the run began with the same prefix
    turn: int | None = None

    @property
    def prompt(self) -> str:
        """The completions form: the conversation's text, one message per paragraph."""
        return "\n\n".join(m["content"] for m in self.messages)


def build_requests(spec: LoadWorkload, count: int, tokenizer: Tokenizer | None) -> list[Request]:
    """`count` requests; a workload with a natural length cycles through it (later cycles share prefixes)."""
    if spec.needs_tokenizer and tokenizer is None:
        raise KvbenchError(f"the {spec.kind} workload needs a tokenizer (--tokenizer)")
    if spec.kind == "random":
        return [_random(spec, tokenizer, i) for i in range(count)]
    if spec.kind == "prefix-repetition":
        return _prefix_repetition(spec, tokenizer, count)
    if spec.kind == "multi-turn":
        return _multi_turn(spec, tokenizer, count)
    if spec.kind.startswith("reuse:"):
        return _reuse_sequence(spec, tokenizer, count)
    return _from_jsonl(Path(spec.kind), spec.output_tokens, count)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _random(spec: LoadWorkload, tok: Tokenizer, i: int) -> Request:
    ids = synthetic_prompt(tok.vocab_size, spec.prompt_tokens, spec.seed + i)
    # decode -> encode -> cut -> decode: text that re-tokenizes to about the target length
    text = tok.decode(tok.encode(tok.decode(ids), add_special_tokens=False)[:spec.prompt_tokens])
    return Request(i, (_user(text),), spec.output_tokens)


def _corpus_ids(tok: Tokenizer) -> list[int]:
    return tok.encode(corpus_text()[:400_000], add_special_tokens=False)


def _prefix_repetition(spec: LoadWorkload, tok: Tokenizer, count: int) -> list[Request]:
    corpus = _corpus_ids(tok)
    prefixes = [tok.decode(corpus_slice(corpus, spec.prefix_tokens, offset=spec.seed + p)) for p in range(spec.prefixes)]
    requests = []
    for i in range(count):
        p = (i // spec.suffixes) % spec.prefixes
        suffix = tok.decode(corpus_slice(corpus, spec.prompt_tokens, offset=spec.seed + spec.prefixes + i))
        requests.append(Request(i, (_user(prefixes[p] + "\n\n" + suffix),), spec.output_tokens,
                                prefix_id=p, shared_prefix=i >= spec.prefixes * spec.suffixes or i % spec.suffixes > 0))
    return requests


def _multi_turn(spec: LoadWorkload, tok: Tokenizer, count: int) -> list[Request]:
    corpus = _corpus_ids(tok)

    def text(n: int, offset: int) -> str:
        return tok.decode(corpus_slice(corpus, n, offset=spec.seed + offset))

    requests = []
    for i in range(count):
        turn, conv = divmod(i % (spec.conversations * spec.turns), spec.conversations)
        history: list[dict] = []
        for k in range(turn):  # earlier turns with fixed replies, so turn k's prompt extends turn k-1's
            history += [_user(text(spec.prompt_tokens, 2 * (conv * spec.turns + k))),
                        {"role": "assistant", "content": text(spec.output_tokens, 2 * (conv * spec.turns + k) + 1)}]
        history.append(_user(text(spec.prompt_tokens, 2 * (conv * spec.turns + turn))))
        requests.append(Request(i, tuple(history), spec.output_tokens, prefix_id=conv,
                                shared_prefix=turn > 0 or i >= spec.conversations * spec.turns, turn=turn))
    return requests


def _reuse_sequence(spec: LoadWorkload, tok: Tokenizer, count: int) -> list[Request]:
    """Request i shares the prefix of the first request that begins with the same SHARED_PREFIX_TOKENS or more
    (rag-interior's requests share a document, but after different preambles: no prefix at all)."""
    sequence = build_reuse_sequence(spec.kind.removeprefix("reuse:"), Texts(tok, spec.seed), count)
    requests = []
    for i, r in enumerate(sequence):
        first = next(j for j in range(i + 1) if j == i or _common_prefix(sequence[j].ids, r.ids) >= SHARED_PREFIX_TOKENS)
        requests.append(Request(i, (_user(tok.decode(r.ids)),), spec.output_tokens, prefix_id=first,
                                shared_prefix=first < i, turn=r.turn))
    return requests


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _from_jsonl(path: Path, max_tokens: int, count: int) -> list[Request]:
    conversations = read_conversations(path)
    return [Request(i, conversations[i % len(conversations)], max_tokens) for i in range(count)]


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


def load_tokenizer(spec: str) -> Tokenizer:
    """The served model's tokenizer: `smollm2-135m` (embedded), a local model dir, or a cached hub id."""
    from transformers import AutoConfig, AutoTokenizer

    from kvbench.models import EMBEDDED, ensure_embedded

    source = str(ensure_embedded()) if spec == EMBEDDED else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise KvbenchError(f"cannot load tokenizer {spec!r}: {exc}; give --tokenizer a local model dir or "
                           f"{EMBEDDED!r}") from None
    if context_window(tokenizer) is None:  # many tokenizers leave it to the model's config
        try:
            tokenizer.model_max_length = AutoConfig.from_pretrained(source).max_position_embeddings
        except (OSError, ValueError, AttributeError):
            pass
    return tokenizer


def context_window(tok: Tokenizer) -> int | None:
    """The tokens prompt and output may span together, when the tokenizer (or its model's config) says."""
    n = getattr(tok, "model_max_length", None)
    return n if isinstance(n, int) and n < _UNKNOWN_LENGTH else None


def fitting_requests(requests: list[Request], tok: Tokenizer, window: int) -> int:
    """How many leading requests fit the context window, prompt and max_tokens together."""
    return next((i for i, r in enumerate(requests)
                 if len(tok.encode(r.prompt, add_special_tokens=False)) + r.max_tokens > window), len(requests))
