"""Workloads: what prompts a point sends.

- `synthetic`: seeded random token ids of an exact length; no tokenizer in the timed path and
  works on any model, random-initialised ones included.
- `text`: real text. With a target length, a slice of an offline corpus (Python's own
  `pydoc_data.topics` documentation) cut to exactly that many tokens; without one, the given
  prompts wrapped in the model's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.models import LoadedModel

KINDS = ("synthetic", "text")

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Explain what a KV cache is in a transformer, in three sentences.",
    "Write a short poem about the sea.",
    "List five uses of a hash table.",
)


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str = "synthetic"
    prompts: tuple[str, ...] = field(default_factory=lambda: DEFAULT_PROMPTS)
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise KvbenchError(f"unknown workload kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.kind == "text" and not self.prompts:
            raise KvbenchError("a text workload needs at least one prompt")


def build_prompts(spec: WorkloadSpec, lm: LoadedModel, prompt_tokens: int | None, count: int) -> list[list[int]]:
    """`count` distinct prompts (token ids) for one point; callers cycle through them per trial."""
    if spec.kind == "synthetic":
        if prompt_tokens is None:
            raise KvbenchError("a synthetic workload needs prompt_tokens (a list of lengths) in the suite")
        return [synthetic_prompt(lm.config.vocab_size, prompt_tokens, spec.seed + i) for i in range(count)]
    if prompt_tokens is None:
        return [lm.encode(spec.prompts[i % len(spec.prompts)]) for i in range(count)]
    corpus = lm.encode(corpus_text()[:400_000], chat=False)
    return [corpus_slice(corpus, prompt_tokens, offset=i) for i in range(count)]


def synthetic_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """Seeded uniform token ids, avoiding the low ids where special tokens (BOS/EOS/PAD) live."""
    low = min(16, vocab_size // 2)
    rng = np.random.default_rng([seed, length])
    return rng.integers(low, vocab_size, size=length).tolist()


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """Python's bundled documentation topics: a few MB of English prose that needs no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def corpus_slice(corpus_ids: list[int], length: int, offset: int = 0) -> list[int]:
    """Exactly `length` corpus tokens, starting at a different place for each offset."""
    if length > len(corpus_ids):
        raise KvbenchError(f"the built-in corpus has {len(corpus_ids)} tokens; prompt_tokens={length} is too long")
    start = (offset * 7919 * 64) % (len(corpus_ids) - length + 1)
    return corpus_ids[start:start + length]
