"""Workloads: what prompts a point sends.

- `synthetic`: seeded random token ids of an exact length; no tokenizer in the timed path and
  works on any model, random-initialised ones included.
- `text`: real text. With a target length, a slice of an offline corpus (`corpus.py`) cut to exactly
  that many tokens, with the true continuation kept for perplexity; without one, the given prompts
  wrapped in the model's chat template.
- `needle`: synthetic long-context retrieval tasks (`tasks.py`), one prompt per task and depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvbench.bench.corpus import corpus_text
from kvbench.bench.tasks import TASKS, make_instance
from kvbench.errors import KvbenchError

if TYPE_CHECKING:  # the load client builds prompts from these modules without torch
    from kvbench.models import LoadedModel

KINDS = ("synthetic", "text", "needle")

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
    samples: int = 1  # distinct prompts per point for synthetic and corpus workloads; trials cycle through them
    corpus: str | None = None  # text file for corpus slices; default: Python's bundled docs
    tasks: tuple[str, ...] = ("passkey",)  # needle workloads
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # needle positions, 0 = start of the context

    def __post_init__(self):
        if self.kind not in KINDS:
            raise KvbenchError(f"unknown workload kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.kind == "text" and not self.prompts:
            raise KvbenchError("a text workload needs at least one prompt")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise KvbenchError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
        if self.samples < 1:
            raise KvbenchError(f"samples must be >= 1, got {self.samples}")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise KvbenchError(f"needle depths must be in [0, 1], got {list(self.depths)}")

    @property
    def distinct_prompts(self) -> int:
        """Distinct prompts per point (batch row): every needle instance, else `samples`."""
        if self.kind == "needle":
            return len(self.tasks) * len(self.depths)
        return self.samples


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    continuation: tuple[int, ...] = ()  # the text's true next tokens, when known (perplexity)
    task: str | None = None
    depth: float | None = None
    answers: tuple[str, ...] = ()  # expected answer strings of a retrieval task

    def score(self, output: str) -> float:
        """Exact match: 1.0 when every expected answer appears in the output."""
        return float(all(a in output for a in self.answers))


def build_prompts(
    spec: WorkloadSpec, lm: LoadedModel, prompt_tokens: int | None, count: int, continuation: int = 0
) -> list[Prompt]:
    """At least `count` prompts for one point; callers cycle through them trial by trial."""
    if spec.kind == "needle":
        if prompt_tokens is None:
            raise KvbenchError("a needle workload needs prompt_tokens (the context lengths) in the suite")
        instances = [make_instance(lm, t, prompt_tokens, d, spec.seed) for t in spec.tasks for d in spec.depths]
        return [Prompt(i.prompt, task=i.task, depth=i.depth, answers=i.answers) for i in instances]
    if spec.kind == "synthetic":
        if prompt_tokens is None:
            raise KvbenchError("a synthetic workload needs prompt_tokens (a list of lengths) in the suite")
        return [Prompt(synthetic_prompt(lm.config.vocab_size, prompt_tokens, spec.seed + i)) for i in range(count)]
    if prompt_tokens is None:
        return [Prompt(lm.encode(spec.prompts[i % len(spec.prompts)])) for i in range(count)]
    corpus = lm.encode(corpus_text(spec.corpus)[:400_000], chat=False)
    slices = [corpus_slice(corpus, prompt_tokens + continuation, offset=i) for i in range(count)]
    return [Prompt(s[:prompt_tokens], tuple(s[prompt_tokens:])) for s in slices]


def synthetic_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """Seeded uniform token ids, avoiding the low ids where special tokens (BOS/EOS/PAD) live."""
    low = min(16, vocab_size // 2)
    rng = np.random.default_rng([seed, length])
    return rng.integers(low, vocab_size, size=length).tolist()


def corpus_slice(corpus_ids: list[int], length: int, offset: int = 0) -> list[int]:
    """Exactly `length` corpus tokens, starting at a different place for each offset."""
    if length > len(corpus_ids):
        raise KvbenchError(f"the corpus has {len(corpus_ids)} tokens; {length} were asked for")
    start = (offset * 7919 * 64) % (len(corpus_ids) - length + 1)
    return corpus_ids[start:start + length]
