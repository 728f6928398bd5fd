"""InfiniGen-style speculative fetch: the whole KV lives on the offload side; each decode step predicts which
tokens matter from a cheap partial score and brings only those to the compute device.

The prediction uses `partial_channels` key channels per KV head (those with the largest mean magnitude over
the prompt, kept on the compute device): the current query, captured by a hook just before each attention
layer, is scored against those channels, and the top tokens (plus the recent `window`) are fetched. Attention
then runs over the fetched tokens only. On a machine without a separate accelerator the offload side is the
same memory: the code path runs as a functional check, and the run says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.strategies import register
from kvbench.strategies.base import tensor_bytes
from kvbench.strategies.budget import capacity
from kvbench.strategies.eviction import ScoredEviction, keep_top
from kvbench.strategies.scores import queries


def fetch_count(budget: float | int, window: int, tokens: int) -> int:
    """Tokens a decode step over `tokens` cached ones fetches: the budget's share, at least the window and one more."""
    return min(tokens, max(capacity(budget, tokens), window + 1))


class SpeculativeLayer(DynamicLayer):
    """All keys/values on `offload`; `update` returns only the tokens predicted to matter."""

    def __init__(self, budget: float | int, window: int, partial_channels: int, offload: torch.device):
        super().__init__()
        self.budget, self.window, self.partial_channels, self.offload = budget, window, partial_channels, offload
        self.channels: torch.Tensor | None = None  # [batch, kv_heads, 1, r] indices of the scoring channels
        self.partial: torch.Tensor | None = None  # [batch, kv_heads, n, r] on the compute device
        self.query: torch.Tensor | None = None  # [batch, heads, 1, head_dim], set before each decode step
        self.observations = 0  # pre-attention hook calls on this layer
        self.partial_steps = 0  # decode steps whose fetch was smaller than the cache...
        self.full_steps_unscored = 0  # ...and those that should have been but had no query to score
        self.fetched_tokens = self.held_tokens = 0  # summed over decode steps

    def fetch_count(self, tokens: int) -> int:
        return fetch_count(self.budget, self.window, tokens)

    def update(self, key_states, value_states, *args, **kwargs):
        device = key_states.device
        if not self.is_initialized:  # prefill: full attention, then everything goes to the offload side
            self.lazy_initialization(key_states, value_states)
            r = min(self.partial_channels, key_states.shape[-1])
            self.channels = key_states.abs().mean(dim=2, keepdim=True).topk(r, dim=-1).indices
            self.partial = key_states.gather(-1, self.channels.expand(-1, -1, key_states.shape[2], -1))
            self.keys, self.values = key_states.to(self.offload), value_states.to(self.offload)
            return key_states, value_states
        self.keys = torch.cat([self.keys, key_states.to(self.offload)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.offload)], dim=-2)
        self.partial = torch.cat([self.partial, key_states.gather(-1, self.channels)], dim=-2)
        n = self.keys.shape[-2]
        fetch = self.fetch_count(n)
        query, self.query = self.query, None  # each step scores with its own query, never a stale one
        self.held_tokens += n
        if fetch >= n or query is None:
            self.full_steps_unscored += fetch < n
            self.fetched_tokens += n
            return self.keys.to(device), self.values.to(device)
        self.partial_steps += 1
        self.fetched_tokens += fetch
        batch, kv_heads = self.partial.shape[:2]
        q = query.view(batch, kv_heads, -1, query.shape[-1]).mean(dim=2, keepdim=True)
        approx = (self.partial * q.gather(-1, self.channels)).sum(-1)  # [batch, kv_heads, n]
        index = keep_top(approx, min(self.window, fetch), fetch).to(self.offload)
        expanded = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        return self.keys.gather(2, expanded).to(device), self.values.gather(2, expanded).to(device)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length > 1 or not self.is_initialized:
            return super().get_mask_sizes(query_length)
        return self.fetch_count(self.get_seq_length() + 1), 0

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values, self.partial)

    def bytes_moved(self) -> int:
        """Keys and values of the fetched tokens (the whole cache on a full fetch), summed over decode steps."""
        if not self.is_initialized:
            return 0
        batch, kv_heads, _, head_dim = self.keys.shape
        per_token = batch * kv_heads * head_dim * (self.keys.element_size() + self.values.element_size())
        return self.fetched_tokens * per_token


@register
@dataclass
class SpeculativeFetch(ScoredEviction):
    name = "speculative_fetch"
    summary = "InfiniGen-style: KV offloaded, each decode step fetches only the tokens a partial-key score predicts"
    observe_before = True  # the query must be known before the layer's cache update picks what to fetch

    partial_channels: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.partial_channels < 1:
            raise KvbenchError(f"partial_channels must be >= 1, got {self.partial_channels}")

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        offload = torch.device("cpu")
        return Cache(layers=[SpeculativeLayer(self.budget, self.window, self.partial_channels, offload)
                             for _ in range(lm.config.num_hidden_layers)])

    def token_bytes_bound(self, lm) -> int:
        """Full KV plus the token's `partial_channels` key channels, kept in the model's dtype on every layer."""
        head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
        r = min(self.partial_channels, head_dim)
        return lm.kv_bytes_per_token + lm.kv_bytes_per_token * r // (2 * head_dim)

    def observe(self, module, hidden, rope, cache) -> None:
        if hidden.shape[1] == 1:
            cache.layers[module.layer_idx].query = queries(module, hidden, rope)

    def check_engaged(self, cache) -> None:  # no eviction to check: only the hooks and the fetches
        self.check_observed(cache)
        unscored = sum(layer.full_steps_unscored for layer in cache.layers)
        if unscored:
            raise NotEngaged(
                f"speculative_fetch fetched the whole cache on {unscored} layer-step(s) where its budget "
                f"{self.budget} called for a partial fetch: its pre-attention hooks gave no query. If transformers "
                "changed how attention layers are called, use a tested version (kvbench env)"
            )

    def notes(self, device):
        if device.type == "cuda":
            return []
        return [f"speculative_fetch on {device.type}: KV 'offloaded' to the same memory, so this is a functional "
                "check of the fetch path, not a transfer saving"]
