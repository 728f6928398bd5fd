"""Next-token selection: greedy, or seeded temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError

# Below this, sampling is greedy in all but name, and logits / temperature nears float32's limit
# (logits of 12 at 1e-38 overflow to inf and give NaN probabilities).
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise KvbenchError(
                f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} (smaller ones are greedy in "
                f"all but name and overflow logits / temperature; use 0 for greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise KvbenchError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise KvbenchError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks one token per row from logits of shape [batch, vocab]; seeded per generation."""

    def __init__(self, config: SamplingConfig, device: torch.device):
        self.config = config
        self.generator = None
        if not config.greedy:
            self.generator = torch.Generator(device=device).manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.greedy:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.config.temperature
        if self.config.top_k:
            kth = torch.topk(logits, min(self.config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.config.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= self.config.top_p  # keep the token that crosses top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
