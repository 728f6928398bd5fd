"""The offline text every real-text workload draws from, encoded once per tokenizer.

Python's bundled documentation topics (`pydoc_data.topics`, a few MB of English prose that needs no
download) or a text file the user names, and Python's own source for code. Its first 400,000
characters are encoded once per (tokenizer, file) and shared by every workload and run kind.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.workloads.tokenizer import Tokenizer

CORPUS_CHARS = 400_000


@lru_cache(maxsize=4)
def corpus_text(path: str | None = None) -> str:
    """Python's bundled docs, or the file at `path`."""
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise KvbenchError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise KvbenchError(f"corpus file {path} is empty")
    return text


@lru_cache(maxsize=4)
def _encoded(tok: Tokenizer, path: str | None) -> tuple[int, ...]:
    return tuple(tok.encode(corpus_text(path)[:CORPUS_CHARS], add_special_tokens=False))


@lru_cache(maxsize=1)
def _stdlib_source() -> str:
    import json.decoder
    import textwrap

    return textwrap.dedent(Path(json.decoder.__file__).read_text())


class Corpus:
    """Token slices of the corpus and of Python's source for one tokenizer; `seed` varies `prose`."""

    def __init__(self, tok: Tokenizer, seed: int = 0, path: str | None = None):
        self.tok, self.seed = tok, seed
        try:
            self.ids = list(_encoded(tok, path))
        except TypeError:  # an unhashable tokenizer: encoded for this corpus only
            self.ids = list(_encoded.__wrapped__(tok, path))

    def encode(self, text: str) -> list[int]:
        """`text` as a segment to concatenate: no special tokens."""
        return list(self.tok.encode(text, add_special_tokens=False))

    def window(self, length: int, offset: int = 0) -> list[int]:
        """Exactly `length` tokens at the offset-th of a fixed stride of starting points (the suites' text
        slices and the load workloads' prefixes and suffixes)."""
        if length > len(self.ids):
            raise KvbenchError(f"the corpus has {len(self.ids)} tokens; {length} were asked for")
        start = (offset * 7919 * 64) % (len(self.ids) - length + 1)
        return self.ids[start:start + length]

    def prose(self, tokens: int, key: int) -> list[int]:
        """Exactly `tokens` tokens from a start drawn from (seed, key) (the reuse sequences' segments)."""
        if tokens >= len(self.ids):
            raise KvbenchError(f"the corpus has {len(self.ids)} tokens; a {tokens}-token slice was asked for")
        rng = np.random.default_rng([self.seed, key])
        start = int(rng.integers(0, len(self.ids) - tokens))
        return self.ids[start:start + tokens]

    def code(self, tokens: int) -> list[int]:
        ids = self.encode(_stdlib_source())
        if len(ids) < tokens:
            raise KvbenchError(f"only {len(ids)} tokens of source code are available; {tokens} were asked for")
        return ids[:tokens]
