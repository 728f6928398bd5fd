"""The one place that calls the model: a forward pass with a KV cache, positions, a mask and `logits_to_keep`.

Every forward in kvbench (generation, teacher forcing, reuse prefill, probes) goes through `forward`,
so a change in how transformers takes its arguments is handled here once. transformers 5.24 renamed the
cache keyword from `past_key_values` to `cache` (the old name warns and goes away in 5.40); which one a
model takes is read from its forward's signature, once per model class.

Positions and masks are passed through as given, so a caller can run any layout the model accepts:
a contiguous tail after cached tokens (positions only), tokens interleaved with cached ones, or several
sequences packed into one row, each with a 4D additive mask `[batch, 1, q_len, kv_len]`.

An `sdpa` model runs on kvbench's attention path (`kvbench.engine.attention`) for the call: new
tokens after cached ones attend without a dense mask; every other layout gets sdpa's own mask and
kernel. A call whose path was on but never ran fails loudly instead of measuring another attention.
"""

from __future__ import annotations

import functools
import inspect

import torch

from kvbench.engine import attention
from kvbench.errors import KvbenchError

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword `model_class.forward` takes its KV cache by."""
    parameters = inspect.signature(model_class.forward).parameters  # follows the deprecation wrappers' __wrapped__
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise KvbenchError(
        f"{model_class.__name__}.forward takes its KV cache by none of {', '.join(CACHE_KEYWORDS)}; this "
        "transformers version is not supported (kvbench env shows the tested range)"
    )


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    cache=None,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """Logits `[batch, kept, vocab]` of one forward over `input_ids` `[batch, q_len]`.

    cache: a transformers `Cache` the forward reads and extends, or None to run without one (full
    recompute). positions: `[batch, q_len]` position ids (default: continue after the cached tokens).
    attention_mask: a 2D padding mask `[batch, kv_len]` or a 4D additive mask. logits_to_keep: how many
    final positions get logits (0: all).
    """
    kwargs = {"input_ids": input_ids, "use_cache": cache is not None, "logits_to_keep": logits_to_keep}
    if cache is not None:
        kwargs[cache_keyword(type(model))] = cache
    if positions is not None:
        kwargs["position_ids"] = positions
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    with attention.engaged(model) as on:
        before = attention.PathCounts.total()
        logits = model(**kwargs).logits
    if on and attention.PathCounts.total() == before:
        raise KvbenchError(
            f"{type(model).__name__} never called kvbench's attention path; this model or transformers version "
            "dispatches attention another way (kvbench env shows the tested range)"
        )
    return logits


def forward_packed(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                   logits_to_keep: torch.Tensor, **attention_kwargs) -> torch.Tensor:
    """Logits `[1, len(logits_to_keep), vocab]` of several sequences packed into one row `[1, T]`, run
    without a transformers cache: the attention function set on the model (kvbench.serve's paged
    attention) holds the KV and receives `attention_kwargs`; only the rows in `logits_to_keep` reach
    the LM head."""
    return model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=logits_to_keep,
                 **attention_kwargs).logits
