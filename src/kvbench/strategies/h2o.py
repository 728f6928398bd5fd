"""H2O (heavy-hitter oracle): keep the tokens with the most accumulated attention plus a recent window.

Attention mass is accumulated per KV head over every query that has run (prompt and generated),
and tokens are evicted during prefill and decode whenever the cache exceeds the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.strategies import register
from kvbench.strategies.eviction import ScoredEviction, keep_top
from kvbench.strategies.scores import attention_mass


@register
@dataclass
class H2O(ScoredEviction):
    name = "h2o"
    summary = "heavy hitters by accumulated attention plus a recent window, evicting in prefill and decode"

    def observe(self, module, hidden, rope, cache) -> None:
        layer = cache.layers[module.layer_idx]
        mass = attention_mass(module, hidden, rope, layer.keys)
        if layer.mass is None:
            layer.mass = mass
        else:
            new = mass.shape[-1] - layer.mass.shape[-1]
            layer.mass = torch.nn.functional.pad(layer.mass, (0, new)) + mass
        drop = layer.over_budget(hidden.shape[1])
        if drop:
            window = min(self.window, layer.size - drop)
            layer.keep(keep_top(layer.mass, window, layer.size - drop))
