"""kvbench's attention path: q new tokens after p cached ones, with no dense mask.

transformers' `sdpa` builds a 4D boolean mask `[batch, 1, q, p + q]` whenever new tokens follow cached
ones (SDPA's `is_causal` aligns top-left), and PyTorch's CPU SDPA then converts it, repeats every
key/value head for grouped-query attention, and runs the masked kernel: at 2000 cached tokens that
is most of a 50-token prefill. This path splits the keys instead (the split-and-merge of cascade and
flash-decoding kernels): the cached keys are attended without any mask, all query heads of a KV head
folded into one query block, the new keys causally, and the two partial results are merged by their
log-sum-exp, which the CPU flash kernel returns.

It is registered with transformers' attention and mask interfaces under `NAME`, and
`model_runner.forward` switches an `sdpa` model to it for each call (`engaged`). Everything that is
not a contiguous causal tail (padding, interleaved cached/computed layouts given as a 4D mask, static
caches, sliding windows) gets the mask `sdpa` would build and runs `sdpa` itself, so every layout the
model accepted keeps its result.

Strategies that choose tokens by attention (h2o) observe it here, where the rotated queries and the
updated keys already are, instead of recomputing the queries in a hook (`observing`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from kvbench.errors import KvbenchError

NAME = "kvbench"
SERVES = "sdpa"  # the implementation this path stands in for (same masks, same results up to fp32 rounding)

# Called with (module, query [b, heads, q, d], keys [b, kv_heads, kv, d], scaling) after the layer's attention.
AttentionObserver = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float], None]
_OBSERVER = "_kvbench_attention_observer"


class PathCounts:
    """How many attention calls took each route since the process started (read by tests and benchmarks)."""

    tail = 0  # q > 1 new tokens after p > 0 cached ones: split and merged
    sdpa = 0  # everything else: transformers' sdpa, with the mask it would build

    @classmethod
    def total(cls) -> int:
        return cls.tail + cls.sdpa


def tail_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
              mask_function: Callable = causal_mask_function, attention_mask: torch.Tensor | None = None,
              local_size: int | None = None, allow_is_causal_skip: bool = True, **kwargs) -> torch.Tensor | None:
    """The mask interface of this path: None exactly when the queries are the causal tail of the keys
    (the keys are every cached token then the new ones, nothing padded) or a single query that sees
    every key, as sdpa skips it; otherwise sdpa's mask, always materialised, so that None never means
    anything else."""
    tail = isinstance(q_offset, int) and kv_offset == 0 and q_offset + q_length == kv_length
    if (allow_is_causal_skip and mask_function is causal_mask_function and local_size is None
            and (q_length == 1 or tail)):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None or bool(padding.all()):
            return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=False, **kwargs)


def tail_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of `query` [b, heads, q, d] as the last q of `key`/`value` [b, kv_heads, p + q, d]
    (0 < q, 0 < p): the cached keys unmasked, the new ones causally, merged by log-sum-exp.
    Returns [b, heads, q, d]."""
    if query.device.type != "cpu":  # the LSE-returning kernel used here is CPU-only
        return masked_tail_attention(query, key, value, scaling)
    batch, heads, q_len, dim = query.shape
    kv_heads, cached = key.shape[1], key.shape[2] - q_len
    groups = heads // kv_heads
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # The query heads sharing a KV head read the same cached keys: fold them into one query block.
    folded = query.reshape(batch, kv_heads, groups * q_len, dim)
    old, old_lse = flash(folded, key[:, :, :cached], value[:, :, :cached], 0.0, False, scale=scaling)
    old, old_lse = old.reshape(batch, heads, q_len, dim), old_lse.reshape(batch, heads, q_len)
    new, new_lse = flash(query, repeat_kv(key[:, :, cached:], groups), repeat_kv(value[:, :, cached:], groups),
                         0.0, True, scale=scaling)
    top = torch.maximum(old_lse, new_lse)
    old_weight, new_weight = (old_lse - top).exp_(), (new_lse - top).exp_()
    total = old_weight + new_weight
    return torch.addcmul(old * (old_weight / total).unsqueeze(-1), new, (new_weight / total).unsqueeze(-1))


def masked_tail_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """`tail_attention` with a dense causal mask, in one SDPA call (devices without the CPU flash kernel)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: returns ([b, q, heads, d], None)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is None and 1 < q_len < kv_len and not dropout and kwargs.get("position_bias") is None:
        PathCounts.tail += 1
        output = tail_attention(query, key, value, scaling).transpose(1, 2).contiguous()
    else:
        PathCounts.sdpa += 1  # with None, q == 1 or q == kv: sdpa's own unmasked cases
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
    observer = getattr(module, _OBSERVER, None)
    if observer is not None:
        observer(module, query, key, scaling)
    return output, None


def register() -> None:
    """Add this path to transformers' attention and mask interfaces (once)."""
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, tail_mask)


@contextmanager
def engaged(model: torch.nn.Module) -> Iterator[bool]:
    """Run `model` on this path for the duration (if it runs `sdpa`; other implementations are left
    as they are). Yields whether the path is on."""
    config = model.config
    if config._attn_implementation != SERVES:
        yield config._attn_implementation == NAME
        return
    register()
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = SERVES


@contextmanager
def observing(modules: list[torch.nn.Module], observer: AttentionObserver) -> Iterator[None]:
    """Call `observer` after each of `modules`' attention on this path; removed when the context exits."""
    taken = [m for m in modules if getattr(m, _OBSERVER, None) is not None]
    if taken:
        raise KvbenchError("an attention observer is already attached to this model; one strategy runs at a time")
    for m in modules:
        setattr(m, _OBSERVER, observer)
    try:
        yield
    finally:
        for m in modules:
            delattr(m, _OBSERVER)
