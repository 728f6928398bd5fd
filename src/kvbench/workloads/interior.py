"""`reuse:interior-<kind>-N`: the same N-token document in the interior of every request, after a different
one-line system prompt each time, with a question whose answer is a generated value inside the document
(scored by exact match, as the needle tasks are). Request 0 is the cold one; every request asks about
another value. Built at the token level like the other reuse sequences: each segment is tokenized on its
own, so the document is the same ids in every request.

- `interior-prose-N`: corpus prose with four "code for <word> is <number>" facts at spread depths.
- `interior-records-N`: a generated table of records (id, name, city, balance), one per line; asks a balance.
- `interior-code-N`: Python standard-library source with four generated constants assigned in it.
- `interior-rag-N`: four N/4-token prose documents, one fact each, sent in a different order every request
  (request 0 in the stored order), as CacheBlend's multi-document evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.workloads.corpus import Corpus

KINDS = ("prose", "records", "code", "rag")
PREAMBLES = (
    "You are a helpful assistant.",
    "You are a careful analyst. Answer briefly and exactly.",
    "You answer questions about the text below.",
    "Read the following material and answer the question at the end.",
    "You are a precise assistant; reply with the requested value only.",
    "The user shares a document. Be concise.",
    "You are an expert reader of reports, tables and code.",
    "Answer from the context only; do not guess.",
)
_WORDS = ("apple", "river", "candle", "falcon", "marble", "violet", "harbor", "pepper", "canyon", "lantern",
          "meadow", "copper", "tundra", "saffron", "glacier", "orchid")
_FIRST = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena")
_LAST = ("Moreno", "Schmidt", "Okafor", "Tanaka", "Novak", "Haddad", "Larsen", "Rossi", "Silva", "Weber")
_CITIES = ("Lyon", "Osaka", "Porto", "Dakar", "Quito", "Turin", "Leeds", "Tartu", "Cusco", "Hobart")
FACTS = 4  # per document (rag: one per sub-document)


@dataclass(frozen=True)
class Fact:
    statement: str  # the text put in the document
    question: str
    answer: str


def check_kind(kind: str) -> bool:
    return kind in KINDS


def sequence(kind: str, size: int, corpus: Corpus, requests: int) -> list[tuple[list[int], tuple[str, ...]]]:
    """(ids, answers) of each request: a preamble, the document (rag: reordered), the i-th question."""
    enc = corpus.encode
    rng = np.random.default_rng([corpus.seed, KINDS.index(kind), size])
    if kind == "rag":
        facts = _facts(rng, "prose")
        documents = [enc("Document: ") + _with_facts(corpus, [f], size // FACTS, rng, 20_000 + d)
                     for d, f in enumerate(facts)]
    else:
        document, facts = _document(kind, size, corpus, rng)
    preamble_order = rng.permutation(len(PREAMBLES))
    out = []
    for i in range(requests):
        if kind == "rag":
            order = range(FACTS) if i == 0 else _shuffled(rng)
            document = [t for d in order for t in documents[d] + enc("\n\n")]
        fact = facts[i % len(facts)]
        ids = (enc(f"System: {PREAMBLES[preamble_order[i % len(PREAMBLES)]]}\n\n") + document
               + enc(f"\n\nQuestion: {fact.question} Answer with the number only.\nAnswer:"))
        out.append((ids, (fact.answer,)))
    return out


def _shuffled(rng: np.random.Generator) -> list[int]:
    while True:  # a warm request never repeats the stored order
        order = rng.permutation(FACTS).tolist()
        if order != list(range(FACTS)):
            return order


def _facts(rng: np.random.Generator, kind: str) -> list[Fact]:
    words = rng.choice(_WORDS, size=FACTS, replace=False).tolist()
    numbers = [str(n) for n in rng.choice(np.arange(10_000, 100_000), size=FACTS, replace=False)]
    if kind == "code":
        names = [f"{w.upper()}_TIMEOUT" for w in words]
        return [Fact(f"{n} = {v}\n", f"What is the value of {n} in the code?", v) for n, v in zip(names, numbers)]
    return [Fact(f" The access code for the {w} archive is {v}. ", f"What is the access code for the {w} archive?", v)
            for w, v in zip(words, numbers)]


def _with_facts(corpus: Corpus, facts: list[Fact], size: int, rng: np.random.Generator, key: int,
                units: list[list[int]] | None = None) -> list[int]:
    """About `size` tokens of filler with the facts inserted at spread depths. The filler is prose drawn by `key`,
    cut anywhere, or the given units (lines of code), cut only between units."""
    statements = [corpus.encode(f.statement) for f in facts]
    length = max(16, size - sum(len(s) for s in statements))
    if units is None:
        units = [[t] for t in corpus.prose(length, key)]
    else:
        kept = np.cumsum([len(u) for u in units]) <= length
        units = [u for u, keep in zip(units, kept) if keep]
    cuts = sorted(int(d * len(units)) for d in rng.uniform(0.1, 0.9, len(facts)))
    out, cursor = [], 0
    for cut, statement in zip(cuts, statements):
        out += [t for u in units[cursor:cut] for t in u] + statement
        cursor = cut
    return out + [t for u in units[cursor:] for t in u]


def _document(kind: str, size: int, corpus: Corpus, rng: np.random.Generator) -> tuple[list[int], list[Fact]]:
    enc = corpus.encode
    if kind == "prose":
        facts = _facts(rng, "prose")
        return enc("Document: ") + _with_facts(corpus, facts, size, rng, 21_000 + size), facts
    if kind == "code":
        facts = _facts(rng, "code")
        body = _with_facts(corpus, facts, size, rng, 0, units=_lines(corpus, size))
        return enc("```python\n") + body + enc("\n```"), facts
    return _records(size, corpus, rng)


def _lines(corpus: Corpus, size: int) -> list[list[int]]:
    """About `size` tokens of source code, one tokenized line each, so a constant gets a line of its own."""
    source = corpus.tok.decode(corpus.code(size), skip_special_tokens=True)
    return [corpus.encode(line) for line in source.splitlines(keepends=True)]


def _records(size: int, corpus: Corpus, rng: np.random.Generator) -> tuple[list[int], list[Fact]]:
    """A table of records, one tokenized line each, up to about `size` tokens; the questions ask the balances of
    records at four spread depths."""
    ids, lines, seen = corpus.encode("Records (id | name | city | balance):\n"), [], set()
    while len(ids) < size:
        if len(seen) == 9000:
            raise KvbenchError(f"a records document of {size} tokens needs more than the 9000 record ids; use at most "
                               "about 100000 tokens")
        number = int(rng.integers(1000, 10_000))
        if number in seen:
            continue
        seen.add(number)
        record = (f"R{number}", f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", str(rng.choice(_CITIES)),
                  str(rng.integers(10_000, 100_000)))
        lines.append(record)
        ids += corpus.encode(" | ".join(record) + "\n")
    if len(lines) - len(lines) // 10 < FACTS:
        raise KvbenchError(f"a records document of {size} tokens holds too few records for {FACTS} questions; "
                           "use at least 100 tokens")
    picks = sorted(rng.choice(np.arange(len(lines) // 10, len(lines)), size=FACTS, replace=False).tolist())
    facts = [Fact("", f"What is the balance of record {lines[p][0]}?", lines[p][3]) for p in picks]
    return ids, facts
