"""`reuse:<name>`: the reuse suites' sequences, requests that re-send the same context, built at the
token level. Each segment (system prompt, document, question...) is tokenized on its own and the ids
are concatenated, so a shared segment is the same token sequence in every request, as a chat template
makes it in practice. Request 0 of a sequence is the cold one.

- `system-prompt`: a ~250-token system prompt, then a different question per request.
- `rag-prefix-N`: an N-token document first, then a question.
- `rag-interior-N`: a different preamble (40-120 tokens) per request, then the document, then a question.
- `multi-turn`: one conversation, request k carries turns 1..k (user turns and fixed replies).
- `code`: ~800 tokens of Python standard-library source, then a question about it.
- `few-shot`: a fixed set of labelled examples, then a new text to classify.
- `break-even-N`: an N-token document then a short question (loading from a tier against recomputing).
- `interior-<kind>-N`: an N-token document of prose, records, code or several documents (rag) after a
  different one-line system prompt, with a checkable question (`kvbench.workloads.interior`).

A request is `shared_prefix` when it begins with the same SHARED_PREFIX_TOKENS or more ids as an earlier
one (`prefix_id`: that request); rag-interior's requests share a document, but after different
preambles: no prefix at all. The traffic suite's documents come from `document_pool`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.workloads import interior
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.request import Request, common_prefix
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec

FIXED = ("system-prompt", "multi-turn", "code", "few-shot")
SIZED = ("rag-prefix", "rag-interior", "break-even")  # take a token count: rag-prefix-2000
SHARED_PREFIX_TOKENS = 16  # vLLM's default KV block: a shorter common prefix is no prefix-cache hit there


def check_name(name: str) -> None:
    if name in FIXED:
        return
    base, _, size = name.rpartition("-")
    sized = base in SIZED or (base.startswith("interior-") and interior.check_kind(base.removeprefix("interior-")))
    if sized and size.isdigit() and int(size) > 0:
        return
    raise KvbenchError(
        f"unknown reuse workload {name!r}; valid: {', '.join(FIXED)}, or {', '.join(s + '-N' for s in SIZED)}, "
        f"interior-{{{','.join(interior.KINDS)}}}-N with N a token count (rag-prefix-2000)"
    )


def build(spec: WorkloadSpec, tok: Tokenizer, count: int) -> list[Request]:
    name, corpus = spec.kind.removeprefix("reuse:"), Corpus(tok, spec.seed)
    check_name(name)
    if name.startswith("interior-"):
        kind, size = name.removeprefix("interior-").rsplit("-", 1)
        ids = [(r, None, answers) for r, answers in interior.sequence(kind, int(size), corpus, count)]
    else:
        ids = [(r, turn, ()) for r, turn in sequence(name, corpus, count)]
    requests = []
    for i, (r, turn, answers) in enumerate(ids):
        first = next(j for j in range(i + 1) if j == i or common_prefix(ids[j][0], r) >= SHARED_PREFIX_TOKENS)
        requests.append(Request(i, None, spec.output_tokens, ids=r, prefix_id=first, shared_prefix=first < i,
                                turn=turn, answers=answers))
    return requests


def sequence(name: str, corpus: Corpus, requests: int) -> list[tuple[list[int], int | None]]:
    """(ids, turn) of `requests` requests of sequence `name` (multi-turn: one per turn)."""
    check_name(name)
    enc = corpus.encode

    def question(i: int) -> list[int]:
        return enc("\n\nQuestion: ") + corpus.prose(24, 1000 + i) + enc("\nAnswer:")

    if name == "system-prompt":
        system = enc("System: ") + corpus.prose(250, 1)
        return [(system + question(i), None) for i in range(requests)]
    if name == "multi-turn":
        history, out = [], []
        for turn in range(1, requests + 1):
            history += enc(f"\n\nUser (turn {turn}): ") + corpus.prose(60, 2000 + turn) + enc("\nAssistant:")
            out.append((list(history), turn))
            history += corpus.prose(40, 3000 + turn)  # the fixed reply the next turn carries
        return out
    if name == "code":
        context = enc("```python\n") + corpus.code(800) + enc("\n```")
        return [(context + question(i), None) for i in range(requests)]
    if name == "few-shot":
        labels = ("positive", "negative", "neutral")
        shots = []
        for k in range(12):
            shots += enc("Text: ") + corpus.prose(24, 4000 + k) + enc(f"\nLabel: {labels[k % 3]}\n\n")
        return [(shots + enc("Text: ") + corpus.prose(24, 5000 + i) + enc("\nLabel:"), None) for i in range(requests)]
    base, size = name.rsplit("-", 1)
    document = enc("Document: ") + corpus.prose(int(size), 6000 + int(size))
    if base == "rag-interior":
        rng = np.random.default_rng([corpus.seed, 7])
        preambles = [enc("Preamble: ") + corpus.prose(int(rng.integers(40, 120)), 7000 + i) for i in range(requests)]
        return [(preambles[i] + enc("\n\n") + document + question(i), None) for i in range(requests)]
    if base == "break-even":
        return [(document + enc("\n\nQ: ") + corpus.prose(8, 8000 + i), None) for i in range(requests)]
    return [(document + question(i), None) for i in range(requests)]


def document_pool(corpus: Corpus, documents: int, tokens: int) -> list[list[int]]:
    """Distinct documents for the traffic suite."""
    return [corpus.encode("Document: ") + corpus.prose(tokens, 9000 + d) for d in range(documents)]
