"""`sharegpt-lengths`: a ShareGPT-style mix of request lengths, shipped in the package (no download).

Each request draws (prompt, output) token counts from `sharegpt_lengths.csv` (where its numbers come
from is written at its top), seeded; the prompt is that many corpus tokens, `max_tokens` the drawn
output length. `prompt_tokens` and `output_tokens` of the spec are not used: the mix sets both. A run
kind that generates a fixed length per point (a suite's `output_tokens`) keeps its own and ignores
`max_tokens`; `kvbench load` sends each request's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from kvbench.workloads.corpus import Corpus
from kvbench.workloads.request import Request
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec


@dataclass(frozen=True)
class LengthBins:
    """A length distribution: bin `k` with probability `weights[k]`, then uniform over [low[k], high[k])."""

    low: tuple[int, ...]
    high: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.weights)
        return w / w.sum()

    def mean(self) -> float:
        return float(self.probabilities @ ((np.asarray(self.low) + np.asarray(self.high) - 1) / 2))

    def variance(self) -> float:
        """Of the mixture: each bin a discrete uniform over its (high - low) values."""
        low, high = np.asarray(self.low, float), np.asarray(self.high, float)
        n = high - low
        means, variances = (low + high - 1) / 2, (n ** 2 - 1) / 12
        return float(self.probabilities @ (variances + means ** 2) - self.mean() ** 2)

    def draw(self, rng: np.random.Generator) -> int:
        b = rng.choice(len(self.weights), p=self.probabilities)
        return int(rng.integers(self.low[b], self.high[b]))


@lru_cache(maxsize=1)
def length_mix() -> tuple[LengthBins, LengthBins]:
    """(prompt, output) length distributions of the shipped table."""
    text = resources.files("kvbench.workloads").joinpath("sharegpt_lengths.csv").read_text()
    rows = [line.split(",") for line in text.splitlines() if line and not line.startswith("#")][1:]
    low, high = tuple(int(r[0]) for r in rows), tuple(int(r[1]) for r in rows)
    return (LengthBins(low, high, tuple(float(r[2]) for r in rows)),
            LengthBins(low, high, tuple(float(r[3]) for r in rows)))


def build(spec: WorkloadSpec, tok: Tokenizer, count: int) -> list[Request]:
    """Request i's lengths and text depend on (seed, i) only: a longer run begins with a shorter one's requests."""
    prompts, outputs = length_mix()
    corpus = Corpus(tok, spec.seed)
    requests = []
    for i in range(count):
        rng = np.random.default_rng([spec.seed, 0x5347, i])
        prompt_tokens, output_tokens = prompts.draw(rng), outputs.draw(rng)
        requests.append(Request(i, None, output_tokens, ids=corpus.prose(prompt_tokens, 11_000 + i)))
    return requests
