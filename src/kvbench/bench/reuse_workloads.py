"""The reuse suites' requests: sequences that re-send the same context, built at the token level.

Each segment (system prompt, document, question...) is tokenized on its own and the ids are
concatenated, so a shared segment is the same token sequence in every request, as a chat template
makes it in practice. Request 0 of a sequence is the cold one.

- `system-prompt`: a ~250-token system prompt, then a different question per request.
- `rag-prefix-N`: an N-token document first, then a question.
- `rag-interior-N`: a different preamble (40-120 tokens) per request, then the document, then a question.
- `multi-turn`: one conversation, request k carries turns 1..k (user turns and fixed replies).
- `code`: ~800 tokens of Python standard-library source, then a question about it.
- `few-shot`: a fixed set of labelled examples, then a new text to classify.
- `break-even-N`: an N-token document then a short question (loading from a tier against recomputing).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from kvbench.bench.corpus import corpus_text
from kvbench.errors import KvbenchError

FIXED = ("system-prompt", "multi-turn", "code", "few-shot")
SIZED = ("rag-prefix", "rag-interior", "break-even")  # take a token count: rag-prefix-2000


@dataclass(frozen=True)
class ReuseRequest:
    ids: list[int]
    turn: int | None = None


def check_workload(name: str) -> None:
    if name in FIXED:
        return
    base, _, size = name.rpartition("-")
    if base in SIZED and size.isdigit() and int(size) > 0:
        return
    raise KvbenchError(
        f"unknown reuse workload {name!r}; valid: {', '.join(FIXED)}, or {', '.join(s + '-N' for s in SIZED)} "
        "with N a token count (rag-prefix-2000)"
    )


class Texts:
    """Token slices of the offline corpus and of Python's own source, for one tokenizer."""

    def __init__(self, tokenizer, seed: int = 0):
        if tokenizer is None:
            raise KvbenchError("the reuse workloads are real text: they need a model with a tokenizer, not a synthetic one")
        self.tokenizer, self.seed = tokenizer, seed
        self.corpus = self.encode(corpus_text()[:400_000])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prose(self, tokens: int, key: int) -> list[int]:
        if tokens >= len(self.corpus):
            raise KvbenchError(f"the corpus has {len(self.corpus)} tokens; a {tokens}-token slice was asked for")
        rng = np.random.default_rng([self.seed, key])
        start = int(rng.integers(0, len(self.corpus) - tokens))
        return self.corpus[start:start + tokens]

    def code(self, tokens: int) -> list[int]:
        ids = self.encode(_stdlib_source())
        if len(ids) < tokens:
            raise KvbenchError(f"only {len(ids)} tokens of source code are available; {tokens} were asked for")
        return ids[:tokens]


@lru_cache(maxsize=1)
def _stdlib_source() -> str:
    import json.decoder
    import textwrap

    return textwrap.dedent(Path(json.decoder.__file__).read_text())


def build(name: str, texts: Texts, requests: int) -> list[ReuseRequest]:
    """`requests` requests of workload `name` (multi-turn: one per turn)."""
    check_workload(name)
    enc = texts.encode

    def question(i: int) -> list[int]:
        return enc("\n\nQuestion: ") + texts.prose(24, 1000 + i) + enc("\nAnswer:")

    if name == "system-prompt":
        system = enc("System: ") + texts.prose(250, 1)
        return [ReuseRequest(system + question(i)) for i in range(requests)]
    if name == "multi-turn":
        history, out = [], []
        for turn in range(1, requests + 1):
            history += enc(f"\n\nUser (turn {turn}): ") + texts.prose(60, 2000 + turn) + enc("\nAssistant:")
            out.append(ReuseRequest(list(history), turn=turn))
            history += texts.prose(40, 3000 + turn)  # the fixed reply the next turn carries
        return out
    if name == "code":
        context = enc("```python\n") + texts.code(800) + enc("\n```")
        return [ReuseRequest(context + question(i)) for i in range(requests)]
    if name == "few-shot":
        labels = ("positive", "negative", "neutral")
        shots = []
        for k in range(12):
            shots += enc("Text: ") + texts.prose(24, 4000 + k) + enc(f"\nLabel: {labels[k % 3]}\n\n")
        return [ReuseRequest(shots + enc("Text: ") + texts.prose(24, 5000 + i) + enc("\nLabel:")) for i in range(requests)]
    base, size = name.rsplit("-", 1)
    document = enc("Document: ") + texts.prose(int(size), 6000 + int(size))
    if base == "rag-interior":
        rng = np.random.default_rng([texts.seed, 7])
        preambles = [enc("Preamble: ") + texts.prose(int(rng.integers(40, 120)), 7000 + i) for i in range(requests)]
        return [ReuseRequest(preambles[i] + enc("\n\n") + document + question(i)) for i in range(requests)]
    if base == "break-even":
        return [ReuseRequest(document + enc("\n\nQ: ") + texts.prose(8, 8000 + i)) for i in range(requests)]
    return [ReuseRequest(document + question(i)) for i in range(requests)]


def document_pool(texts: Texts, documents: int, tokens: int) -> list[list[int]]:
    """Distinct documents for the traffic suite."""
    return [texts.encode("Document: ") + texts.prose(tokens, 9000 + d) for d in range(documents)]


