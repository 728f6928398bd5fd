"""SnapKV: after prefill, keep the prompt tokens the last `window` queries attend to most (pooled), then decode.

The observation window's attention, max-pooled over neighbouring tokens (`kernel`) so kept tokens
come with their context, picks which prompt tokens survive; the window itself is always kept.
The cache then grows normally during decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.strategies import register
from kvbench.strategies.budget import capacity
from kvbench.strategies.eviction import ScoredEviction, keep_top
from kvbench.strategies.scores import attention_mass


@register
@dataclass
class SnapKV(ScoredEviction):
    name = "snapkv"
    summary = "compresses the prompt after prefill using an observation window's pooled attention"

    kernel: int = 7

    def __post_init__(self):
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise KvbenchError(f"kernel must be a positive odd number, got {self.kernel}")

    def max_held(self, layer) -> int:
        """Only the prompt is compressed; decoded tokens are all kept."""
        prompt = layer.prompt_tokens
        return min(prompt, capacity(self.budget, prompt)) + layer.seen - prompt

    def observe(self, module, hidden, rope, cache) -> None:
        layer = cache.layers[module.layer_idx]
        prompt_len = hidden.shape[1]
        if prompt_len == 1 or layer.seen != prompt_len:  # only the prefill is compressed
            return
        kept = capacity(self.budget, prompt_len)
        if kept >= prompt_len:
            return
        window = min(self.window, prompt_len)
        mass = attention_mass(module, hidden, rope, layer.keys, last_queries=window)
        pooled = F.max_pool1d(mass, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        layer.keep(keep_top(pooled, window, kept))
