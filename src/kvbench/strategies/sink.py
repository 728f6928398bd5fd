"""StreamingLLM: keep the first `sink_tokens` (attention sinks) and the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.strategies import register
from kvbench.strategies.eviction import EvictingLayer, EvictionStrategy


class SinkLayer(EvictingLayer):
    def __init__(self, budget, sink_tokens: int):
        super().__init__(budget)
        self.sink_tokens = sink_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        drop = self.over_budget(key_states.shape[-2])
        if drop:  # this step attends over everything; storage shrinks for the next one
            n = self.size
            index = torch.cat([torch.arange(self.sink_tokens), torch.arange(self.sink_tokens + drop, n)])
            self.keep(index.to(keys.device).expand(keys.shape[0], keys.shape[1], -1))
        return keys, values


@register
@dataclass
class Sink(EvictionStrategy):
    name = "sink"
    summary = "StreamingLLM: the first sink_tokens plus a recent window, within the budget"

    sink_tokens: int = 4

    def new_layer(self):
        return SinkLayer(self.budget, self.sink_tokens)

    def protected(self):
        return self.sink_tokens
