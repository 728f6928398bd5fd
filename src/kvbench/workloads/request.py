"""The one request form every workload produces and every run kind consumes.

A workload is built at the level it is defined at: token ids (synthetic, corpus slices, reuse
sequences, prefix-repetition, sharegpt-lengths) or messages (text prompts as written, needle tasks,
multi-turn chats, a .jsonl of conversations). `complete` then renders the form a run kind asks for:

- ids -> text (`kvbench load`, a server): the decoded ids, as one user message. A server tokenizes
  that text again; for ids that came from text (the corpus) this gives the same ids back, for random ids
  (which no text tokenizes to) the synthetic workload renders its own text (see `synthetic.py`).
- messages -> ids (in-process kinds: suites, reuse): the tokenizer's chat template with the
  generation prompt when it has one (what a chat server applies), else the messages' text, one per
  paragraph, with the tokenizer's special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvbench.workloads.tokenizer import Tokenizer

FORMS = ("ids", "text")


@dataclass(frozen=True)
class Request:
    """One request of a workload. `ids` is the in-process form, `messages` the chat form a server gets."""

    index: int
    messages: tuple[dict, ...] | None  # None until rendered (a token-level workload asked for ids)
    max_tokens: int
    ids: list[int] | None = None  # None until rendered (a text workload sent as text)
    prefix_id: int | None = None  # requests with one id begin with the same context
    shared_prefix: bool = False  # an earlier request of the workload began with the same prefix
    turn: int | None = None
    continuation: tuple[int, ...] = ()  # the text's true next tokens, when known (perplexity)
    task: str | None = None  # needle tasks: scored by `score`
    depth: float | None = None
    answers: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        """The completions form: the conversation's text, one message per paragraph."""
        return "\n\n".join(m["content"] for m in self.messages or ())

    def score(self, output: str) -> float:
        """Exact match: 1.0 when every expected answer appears in the output."""
        return float(all(a in output for a in self.answers))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def complete(request: Request, tok: Tokenizer, form: str) -> Request:
    """`request` with the form a run kind asked for ("ids" or "text") filled in."""
    if form == "ids" and request.ids is None:
        return replace(request, ids=ids_of(request.messages, tok))
    if form == "text" and request.messages is None:
        return replace(request, messages=(user(tok.decode(request.ids)),))
    return request


def ids_of(messages: tuple[dict, ...], tok: Tokenizer) -> list[int]:
    """The ids a chat server would run for `messages`: chat template and generation prompt when there is one."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tok.encode("\n\n".join(m["content"] for m in messages)))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
