"""H2O (heavy-hitter oracle): keep the tokens with the most accumulated attention plus a recent window.

Attention mass is accumulated per KV head over every query that has run (prompt and generated),
and tokens are evicted during prefill and decode whenever the cache exceeds the budget. The mass is
taken inside kvbench's attention path (`kvbench.engine.attention.observing`), from the queries and
keys the layer's attention already holds, rather than by recomputing the queries in a hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvbench.engine import attention
from kvbench.errors import KvbenchError
from kvbench.strategies import register
from kvbench.strategies.eviction import ScoredEviction, keep_top
from kvbench.strategies.scores import attention_modules, query_mass


@register
@dataclass
class H2O(ScoredEviction):
    name = "h2o"
    summary = "heavy hitters by accumulated attention plus a recent window, evicting in prefill and decode"

    @contextmanager
    def attach(self, lm, cache):
        implementation = lm.config._attn_implementation
        if implementation not in (attention.SERVES, attention.NAME):
            raise KvbenchError(
                f"h2o takes attention scores from kvbench's attention path, which serves {attention.SERVES!r} models; "
                f"{lm.name} runs {implementation!r}: load it with attn_implementation={attention.SERVES!r}"
            )

        def observe(module, query, keys, scaling):
            layer = cache.layers[module.layer_idx]
            layer.observations += 1
            self.accumulate(layer, query_mass(query, keys, scaling), query.shape[2])

        with attention.observing(attention_modules(lm.model), observe):
            yield

    def accumulate(self, layer, mass: torch.Tensor, step_len: int) -> None:
        """Add this step's mass [batch, kv_heads, kv_len] and evict if the layer is over its budget."""
        if layer.mass is None:
            layer.mass = mass
        else:
            new = mass.shape[-1] - layer.mass.shape[-1]
            layer.mass = torch.nn.functional.pad(layer.mass, (0, new)) + mass
        drop = layer.over_budget(step_len)
        if drop:
            window = min(self.window, layer.size - drop)
            layer.keep(keep_top(layer.mass, window, layer.size - drop))
