"""Paged attention for unmodified HF models, through transformers' attention interface.

The engine runs the model on one packed row `[1, T]` without a transformers cache, and passes a
`StepContext` as a forward keyword (`kvbench_ctx`); transformers hands keyword arguments down to the
attention function, which writes each new token's K/V into its slot in the pool and attends:
- rows with one query token (decode, or a one-token chunk) in groups of similar context length: per group
  one gather of its rows' context slots, padded to the group's longest, and one SDPA with a key-padding
  mask (none when no row is padded). Grouping keeps one long request from padding every short one to
  its length (`runner.single_groups`);
- longer prefill chunks one by one: SDPA over the chunk's context slots with a causal mask offset by
  the tokens before the chunk (plain `is_causal` when there are none).
Positions here are a request's table entries (its kept tokens, in order, after a policy evicted; see
`kvbench.serve.request.Request`). A policy that scores tokens (h2o, snapkv) asks for the attention mass
each entry receives by giving the context buffers to add it to: the single-token rows then compute their
scores explicitly (one matmul, softmax, one matmul) instead of SDPA, and a chunk scores its last
`mass_queries` queries over its context. A policy that chooses what each single row reads (offload, speculative
fetch: `kvbench.serve.fetch`) sets `StepContext.fetch`, which returns a group's K/V in place of the gather.
transformers builds no mask for an attention name it does not know (`create_causal_mask` returns
None), so nothing is computed twice. The name is set on the model's config only inside
`paged_attention(model)`, so every other forward in kvbench keeps the model's own attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvbench.errors import KvbenchError
from kvbench.serve.kv import KVStore
from kvbench.strategies.scores import query_mass

ATTENTION_NAME = "kvbench_paged"


@dataclass(frozen=True)
class Chunk:
    """A prefill chunk: packed rows [q0, q1) attend to `slots` (its request's entries 0..past+n)."""

    q0: int
    q1: int
    slots: torch.Tensor  # [past + n]
    mask: torch.Tensor | None  # [n, past + n] bool (True: attend), None when past == 0 (plain causal)
    mass: torch.Tensor | None = None  # [past + n] float32: gets the attention of its last `mass_queries` queries
    mass_queries: int = 0


@dataclass(frozen=True)
class SingleGroup:
    """Single-token rows [r0, r1) of the packed row, attended together over their context slots."""

    r0: int
    r1: int
    index: torch.Tensor  # [Bg, Lg] slots of each row's context (0 where padded)
    mask: torch.Tensor | None  # [Bg, 1, 1, Lg] bool; None when every row has Lg tokens


@dataclass(frozen=True)
class StepContext:
    """One step's metadata, shared by every layer: packed rows are the single-token rows first
    (`num_single`, in `singles` groups), then the chunks."""

    store: KVStore
    slot_mapping: torch.Tensor  # [T]: where each packed row's K/V is written
    num_single: int
    singles: tuple[SingleGroup, ...]
    chunks: tuple[Chunk, ...]
    single_mass: torch.Tensor | None = None  # [num_single, single_width] float32: each single row's attention per entry
    # a policy that picks which context each single row attends (kvbench.serve.fetch): called per group as
    # fetch(layer, group, q [Bg, kvh, group, d], new_keys [Bg, kvh, d]) -> keys, values [Bg, kvh, K, d], mask
    fetch: Callable | None = None

    @property
    def single_width(self) -> int:
        """The longest context of a single row."""
        return max((g.index.shape[1] for g in self.singles), default=0)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            kvbench_ctx: StepContext | None = None, **_):
    """The registered attention function: q `[1, H, T, d]`, k and v `[1, kvh, T, d]` -> `[1, T, H, d]`."""
    ctx = kvbench_ctx
    if ctx is None:
        raise KvbenchError(f"{ATTENTION_NAME} attention runs only inside kvbench.serve's engine step")
    layer = module.layer_idx
    ctx.store.write(layer, ctx.slot_mapping, key[0].transpose(0, 1), value[0].transpose(0, 1))
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, d]
    for g in ctx.singles:
        b = g.r1 - g.r0
        # One query per row: the heads sharing a KV head become that head's queries ([Bg, kvh, group, d]),
        # so GQA needs neither repeated K/V nor enable_gqa (as transformers' sdpa does for decode).
        q = query[0, :, g.r0:g.r1].transpose(0, 1).reshape(b, key.shape[1], -1, query.shape[3])
        if ctx.fetch is not None:
            keys, values, mask = ctx.fetch(layer, g, q, key[0, :, g.r0:g.r1].transpose(0, 1))
        else:
            keys, values = (t.transpose(1, 2) for t in ctx.store.gather(layer, g.index))  # [Bg, kvh, Lg, d]
            mask = g.mask
        if ctx.single_mass is None:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        else:
            mass = ctx.single_mass[g.r0:g.r1, :g.index.shape[1]]
            o = scored_attention(q, keys, values, mask, scaling, mass)
        out[g.r0:g.r1] = o.reshape(b, query.shape[1], query.shape[3])
    for c in ctx.chunks:
        if c.mask is None:  # no past: the chunk's own K/V are its whole context
            keys, values = key[:, :, c.q0:c.q1], value[:, :, c.q0:c.q1]
        else:
            keys, values = (t.transpose(0, 1)[None] for t in ctx.store.gather(layer, c.slots))
        o = F.scaled_dot_product_attention(query[:, :, c.q0:c.q1], keys, values, attn_mask=c.mask,
                                           is_causal=c.mask is None, scale=scaling, enable_gqa=True)
        out[c.q0:c.q1] = o[0].transpose(0, 1)
        if c.mass is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            c.mass.add_(query_mass(query[:, :, c.q0:c.q1], keys, scale, last_queries=c.mass_queries)[0].sum(0))
    return out[None], None


def scored_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None, mass: torch.Tensor) -> torch.Tensor:
    """One query per row with explicit scores, adding each key's probability (averaged over the query heads
    of its KV head, summed over KV heads, as `query_mass` does) to `mass` [B, L].
    q `[B, kvh, group, d]`, keys/values `[B, kvh, L, d]`, mask `[B, 1, 1, L]` bool or None."""
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, keys.transpose(-1, -2)).float().mul_(scale)  # [B, kvh, group, L]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    mass += probs.mean(dim=2).sum(dim=1)
    return torch.matmul(probs.to(values.dtype), values)


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)


@contextlib.contextmanager
def paged_attention(model):
    """Run `model`'s forwards with the paged attention; its own implementation is restored after."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def check_servable(lm) -> None:
    """Refuse models whose layers do not all attend to every earlier position (sliding-window or hybrid):
    the pool keeps every position and the gather applies no window, so their output would differ."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in DynamicCache(config=lm.config).layers}
    if kinds != {DynamicLayer.__name__}:
        raise KvbenchError(
            f"{lm.name} uses {', '.join(sorted(kinds))} cache layers (sliding-window or hybrid attention); "
            "kvbench serve supports models whose every layer attends to all earlier positions"
        )
