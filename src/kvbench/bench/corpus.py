"""Offline text: Python's bundled documentation topics by default, or any text file the user names."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from kvbench.errors import KvbenchError


@lru_cache(maxsize=4)
def corpus_text(path: str | None = None) -> str:
    """A few MB of English prose that needs no download (`pydoc_data.topics`), or the file at `path`."""
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
