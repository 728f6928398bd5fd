"""Prefill a prompt from cached blocks plus computed tokens, in one forward pass.

The cache is filled with the cached K/V (keys re-rotated to their new positions), and one forward
runs over every token that must be computed (missing, or chosen for recompute), at its true position.
Where those tokens are a contiguous tail (prefix reuse), the model's own causal mask applies; where
they are interleaved with cached tokens (chunk reuse), a 4D mask lets each computed token attend to
every cached or computed token at an earlier or equal position. Afterwards the cache is put back in
position order, so decoding proceeds as after a normal prefill.

Nothing here loops over tokens in Python: blocks are concatenated once, moved to the device once,
and selected with index tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.engine.model_runner import forward
from kvbench.reuse.plan import Hit
from kvbench.reuse.rope import Rerotator
from kvbench.reuse.store import Block

RECOMPUTE = ("none", "selective", "cacheblend")


@dataclass(frozen=True)
class Recompute:
    """How to repair non-prefix (approximate) hits: which of their tokens to compute again."""

    kind: str = "none"
    selective_tokens: int = 32  # `selective`: the first tokens of every run of approximate hits
    blend_fraction: float = 0.15  # `cacheblend`: share of approximate tokens with the largest K/V deviation
    probe_layer: int = 1  # `cacheblend`: the layer where the deviation is measured


class _Stop(Exception):
    """Raised by a hook to end a probe forward after the probe layer."""


def _raise_stop(*_):
    raise _Stop


def gather(loaded: list[tuple[Hit, Block]], rerotator: Rerotator | None, device: torch.device) -> torch.Tensor:
    """[layers, 2, kv_heads, covered_tokens, head_dim] for the hits, keys moved to their new positions."""
    parts = []
    for hit, block in loaded:
        kv = block.kv[:, :, :, :hit.length]
        delta = hit.start - block.position
        if delta:
            kv = torch.stack([rerotator.shift(kv[:, 0], delta), kv[:, 1]], dim=1)
        parts.append(kv)
    return torch.cat(parts, dim=3).to(device, non_blocking=True)


def approximate_runs(loaded: list[tuple[Hit, Block]], lossy: set[str]) -> list[list[Hit]]:
    """Maximal runs of adjacent hits that are not exact (content hits, or from a lossy tier)."""
    runs: list[list[Hit]] = []
    for hit, _ in loaded:
        if hit.exact and hit.key not in lossy:
            continue
        if runs and runs[-1][-1].start + runs[-1][-1].length == hit.start:
            runs[-1].append(hit)
        else:
            runs.append([hit])
    return runs


def selective_positions(runs: list[list[Hit]], tokens: int) -> torch.Tensor:
    spans = [torch.arange(run[0].start, min(run[0].start + tokens, run[-1].start + run[-1].length)) for run in runs]
    return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)


def blend_positions(lm, ids: torch.Tensor, covered: torch.Tensor, kv: torch.Tensor, runs: list[list[Hit]],
                    recompute: Recompute) -> torch.Tensor:
    """CacheBlend's selection: run the prompt through the first layers up to `probe_layer` with full
    context, and pick the approximate tokens whose cached K/V differ most from the fresh ones there."""
    from transformers import DynamicCache

    approx = torch.cat([torch.arange(r[0].start, r[-1].start + r[-1].length) for r in runs])
    probe = DynamicCache(config=lm.config)
    layers = lm.model.get_decoder().layers
    after = layers[recompute.probe_layer + 1] if recompute.probe_layer + 1 < len(layers) else None
    stop = after.register_forward_pre_hook(_raise_stop) if after is not None else None
    try:
        forward(lm.model, ids, cache=probe)
    except _Stop:
        pass
    finally:
        if stop is not None:
            stop.remove()
    fresh_k = probe.layers[recompute.probe_layer].keys[0, :, approx.to(ids.device)]
    fresh_v = probe.layers[recompute.probe_layer].values[0, :, approx.to(ids.device)]
    where = torch.searchsorted(covered, approx).to(kv.device)
    cached = kv[recompute.probe_layer, :, :, where]
    deviation = ((cached[0] - fresh_k).float().pow(2).sum((0, 2)) + (cached[1] - fresh_v).float().pow(2).sum((0, 2)))
    count = math.ceil(recompute.blend_fraction * len(approx))
    return approx[deviation.topk(count).indices.cpu()].sort().values


def prefill(lm, cache, tokens: list[int], loaded: list[tuple[Hit, Block]], kv: torch.Tensor | None,
            recompute_positions: torch.Tensor) -> torch.Tensor:
    """Fill `cache` with the cached K/V and compute the rest; returns the last position's logits."""
    n, device = len(tokens), lm.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    cached = torch.zeros(n, dtype=torch.bool)
    for hit, _ in loaded:
        cached[hit.start:hit.start + hit.length] = True
    covered = cached.nonzero().squeeze(1)
    cached[recompute_positions] = False
    kept = cached.nonzero().squeeze(1)
    compute = (~cached).nonzero().squeeze(1)
    if kv is not None and len(kept):
        if len(kept) < len(covered):
            kv = kv.index_select(3, torch.searchsorted(covered, kept).to(kv.device))
        for index, layer in enumerate(cache.layers):  # no copy here: the forward's concatenation makes the one copy
            keys, values = kv[index, 0][None], kv[index, 1][None]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
    tail = bool(len(kept) == 0 or (kept[-1] < compute[0] and len(kept) == kept[-1] + 1))
    mask = None
    if not tail:
        key_positions = torch.cat([kept, compute])
        allowed = key_positions[None, :] <= compute[:, None]
        mask = torch.zeros(allowed.shape, dtype=lm.dtype).masked_fill(~allowed, torch.finfo(lm.dtype).min)
        mask = mask[None, None].to(device)
    logits = forward(lm.model, ids[compute.to(device)][None], cache=cache, positions=compute.to(device)[None],
                     attention_mask=mask)
    if not tail:
        order = torch.cat([kept, compute]).argsort().to(device)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.index_select(2, order), layer.values.index_select(2, order)
    return logits[:, -1]
