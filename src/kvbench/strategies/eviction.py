"""Shared plumbing of eviction strategies: a cache layer that really drops tokens.

Dropping means new, smaller key/value tensors (the old ones are freed), never a mask over tokens
that stay allocated. Kept keys keep the rotation of their original positions and new tokens
continue the original position ids, so relative RoPE distances stay exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.strategies.base import Capabilities, CacheStrategy
from kvbench.strategies.budget import capacity, validate_budget
from kvbench.strategies.scores import attention_hooks

# Decode evicts in batches of this many tokens: gathering the cache every step would cost more than it saves.
EVICT_SLACK = 16


class EvictingLayer(DynamicLayer):
    """A DynamicLayer that counts the tokens it has seen and can keep a subset of them."""

    def __init__(self, budget: float | int):
        super().__init__()
        self.budget = budget
        self.seen = 0
        self.mass: torch.Tensor | None = None  # accumulated attention per cached token (H2O)
        self.prompt_tokens: int | None = None  # tokens of the first update (the prefill)
        self.observations = 0  # attention-score hook calls on this layer

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        if self.prompt_tokens is None:
            self.prompt_tokens = key_states.shape[-2]
        self.seen += key_states.shape[-2]
        return keys, values

    @property
    def size(self) -> int:
        return self.get_seq_length()

    def over_budget(self, step_len: int) -> int:
        """How many tokens to drop now: all excess after prefill, batches of EVICT_SLACK while decoding."""
        cap = capacity(self.budget, self.seen)
        slack = 0 if step_len > 1 else EVICT_SLACK
        return self.size - cap if self.size > cap + slack else 0

    def keep(self, index: torch.Tensor) -> None:
        """Keep the tokens at `index` [batch, kv_heads, k] (ascending) and free the rest."""
        expanded = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, expanded)
        self.values = self.values.gather(2, expanded)
        if self.mass is not None:
            self.mass = self.mass.gather(2, index)


def keep_top(scores: torch.Tensor, protected_tail: int, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep - protected_tail` best-scored tokens plus the last `protected_tail`.

    scores: [batch, kv_heads, n]; returns [batch, kv_heads, keep].
    """
    n = scores.shape[-1]
    body = scores[..., : n - protected_tail]
    top = body.topk(keep - protected_tail, dim=-1).indices
    tail = torch.arange(n - protected_tail, n, device=scores.device).expand(*scores.shape[:-1], protected_tail)
    return torch.cat([top, tail], dim=-1).sort(dim=-1).values


@dataclass
class EvictionStrategy(CacheStrategy):
    """Base of budgeted strategies: `budget` is a fraction of the tokens seen or a token count."""

    budget: float | int = 0.5

    capabilities: ClassVar[Capabilities] = Capabilities(lossless=False, supports_batching=False)

    def __post_init__(self):
        validate_budget(self.budget)
        if self.protected() < 0:
            raise KvbenchError(f"{self.name}: window and sink sizes must be >= 0")
        if isinstance(self.budget, int) and self.protected() >= self.budget:
            raise KvbenchError(
                f"{self.name}: the {self.protected()} tokens always kept (window/sinks) must be fewer than the "
                f"budget ({self.budget} tokens)"
            )

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        kept = capacity(self.budget, prompt_tokens)
        if kept < prompt_tokens and kept <= self.protected():
            raise KvbenchError(
                f"{self.name}: budget {self.budget} keeps {kept} of a {prompt_tokens}-token prompt, not more than the "
                f"{self.protected()} tokens it always keeps (window/sinks); raise the budget or lower the window"
            )
        return Cache(layers=[self.new_layer() for _ in range(lm.config.num_hidden_layers)])

    def new_layer(self) -> EvictingLayer:
        return EvictingLayer(self.budget)

    def protected(self) -> int:
        """Tokens the strategy always keeps (recent window, attention sinks)."""
        raise NotImplementedError

    def max_held(self, layer: EvictingLayer) -> int:
        """The most tokens `layer` may hold after its last update if eviction ran: the budget of the tokens
        seen, plus the decode slack not yet evicted."""
        return capacity(self.budget, layer.seen) + EVICT_SLACK

    def check_engaged(self, cache) -> None:
        for index, layer in enumerate(cache.layers):
            if layer.seen and layer.size > self.max_held(layer):
                raise NotEngaged(
                    f"{self.name} did not evict: layer {index} holds {layer.size} of {layer.seen} tokens seen, over "
                    f"its budget {self.budget} (at most {self.max_held(layer)}); the run would measure an unevicted "
                    "cache. If transformers changed how attention layers are called, use a tested version "
                    "(kvbench env)"
                )


@dataclass
class ScoredEviction(EvictionStrategy):
    """Base of strategies that choose tokens by attention: hooks call `observe` after every attention layer
    (or just before it, with `observe_before`)."""

    window: int = 32  # recent tokens always kept

    capabilities: ClassVar[Capabilities] = Capabilities(
        lossless=False, supports_batching=False, needs_attention_scores=True
    )
    observe_before: ClassVar[bool] = False

    def protected(self) -> int:
        return self.window

    @contextmanager
    def attach(self, lm, cache):
        def observe(module, hidden, rope):
            cache.layers[module.layer_idx].observations += 1
            self.observe(module, hidden, rope, cache)

        with attention_hooks(lm.model, observe, before=self.observe_before):
            yield

    def check_engaged(self, cache) -> None:
        self.check_observed(cache)
        super().check_engaged(cache)

    def check_observed(self, cache) -> None:
        """Refuse a generation during which the hooks never fired on a layer that holds tokens."""
        unobserved = [i for i, layer in enumerate(cache.layers) if layer.is_initialized and not layer.observations]
        if unobserved:
            raise NotEngaged(
                f"{self.name}'s attention-score hooks never fired on layer(s) {', '.join(map(str, unobserved))}; "
                "without scores it cannot choose tokens. If transformers changed how attention layers are called, "
                "use a tested version (kvbench env)"
            )

    def observe(self, module: torch.nn.Module, hidden: torch.Tensor, rope, cache: Cache) -> None:
        """Called around `module`'s attention: hidden [batch, q_len, hidden], rope (cos, sin), the cache."""
        raise NotImplementedError
