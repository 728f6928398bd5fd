"""Attention probabilities of the current queries over the cached keys, from a hook on each attention layer.

As kvpress does, nothing in the model is edited: a forward hook on every attention module (scoped by
`attention_hooks`, removed in `finally`) sees the layer input and the rotary embeddings, recomputes
the queries with the layer's own q_proj and RoPE, and scores them against the keys the cache holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from kvbench.errors import KvbenchError

ScoreObserver = Callable[[torch.nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], None]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder, in layer order; refuses models it cannot score."""
    found = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    if not found:
        raise KvbenchError(
            f"{type(model).__name__} has no Llama-style attention layers (q_proj, layer_idx, head_dim) to score; "
            "attention-score strategies cannot work with it"
        )
    return sorted(found, key=lambda m: m.layer_idx)


@contextmanager
def attention_hooks(model: torch.nn.Module, observe: ScoreObserver, before: bool = False) -> Iterator[None]:
    """Call `observe(module, hidden_states, position_embeddings)` after (or before) each attention layer.

    The cache is not taken from the layer's arguments (transformers renames that keyword between
    versions): the caller's `observe` already holds the cache it made. A layer that gets no rotary
    embeddings cannot be scored and fails loudly instead of being skipped.
    """

    def hook(module, args, kwargs, output=None):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rope = kwargs.get("position_embeddings")
        if hidden is None or rope is None:
            raise KvbenchError(
                f"{type(module).__name__} gets no {'hidden states' if hidden is None else 'rotary position embeddings'}"
                " as this transformers version calls it; attention scores cannot be computed (kvbench env shows "
                "the tested transformers range)"
            )
        observe(module, hidden, rope)

    modules = attention_modules(model)
    if before:
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    else:
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def queries(module: torch.nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotated queries [batch, heads, q_len, head_dim], as the layer computed them."""
    batch, q_len, _ = hidden.shape
    q = module.q_proj(hidden).view(batch, q_len, -1, module.head_dim).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in rope)
    return q * cos + _rotate_half(q) * sin


def attention_mass(
    module: torch.nn.Module, hidden: torch.Tensor, rope, keys: torch.Tensor, last_queries: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention each cached key receives from this step's queries, recomputed from the layer input
    (for a hook): `query_mass` of the layer's rotated queries."""
    q = queries(module, hidden, rope)
    return query_mass(q, keys, getattr(module, "scaling", q.shape[-1] ** -0.5), last_queries, chunk)


def query_mass(
    q: torch.Tensor, keys: torch.Tensor, scale: float, last_queries: int | None = None, chunk: int = 256,
) -> torch.Tensor:
    """Attention each cached key receives, summed over this step's queries: [batch, kv_heads, kv_len].

    q: rotated queries [batch, heads, q_len, head_dim]; keys: [batch, kv_heads, kv_len, head_dim], the
    cache after this step's update; the step's queries are its last q_len positions (causal among
    themselves). `last_queries` keeps only the final ones (an observation window). Probabilities are
    averaged over the query heads that share a KV head, and computed `chunk` queries at a time so a
    long prefill never holds the whole score matrix.
    """
    if last_queries is not None:
        q = q[:, :, -last_queries:]
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    q = q.reshape(batch, kv_heads, heads // kv_heads, q_len, dim)
    if q_len == 1:  # a decode step: one query sees every key, no mask and no chunks
        scores = torch.matmul(q[:, :, :, 0].float(), keys.float().transpose(-1, -2)).mul_(scale)
        return scores.softmax(dim=-1).mean(dim=2)
    first_query_pos = kv_len - q_len  # the queries sit at the end of the cached sequence
    mass = torch.zeros(batch, kv_heads, kv_len, device=keys.device, dtype=torch.float32)
    key_pos = torch.arange(kv_len, device=keys.device)
    for start in range(0, q_len, chunk):
        qc = q[:, :, :, start:start + chunk]
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qc.float(), keys.float()) * scale
        q_pos = first_query_pos + start + torch.arange(qc.shape[3], device=keys.device)
        scores = scores.masked_fill(key_pos[None, :] > q_pos[:, None], float("-inf"))
        mass += scores.softmax(dim=-1).mean(dim=2).sum(dim=2)
    return mass
