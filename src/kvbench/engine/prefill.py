"""The floor of a warm prefill: what reuse would cost with a free lookup and free loading."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvbench.device import clock
from kvbench.engine.model_runner import forward
from kvbench.models import LoadedModel


@torch.inference_mode()
def prefill_floor_ms(lm: LoadedModel, ids: list[int], cached: int) -> float:
    """The floor of a warm prefill: the first `cached` tokens already in a ready cache (built untimed),
    only the rest run through the model, and the first token is sampled. No lookup, no loading."""
    device = lm.device
    cache = DynamicCache(config=lm.config)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    forward(lm.model, prompt[:, :cached], cache=cache)
    start = clock(device)
    logits = forward(lm.model, prompt[:, cached:], cache=cache,
                     positions=torch.arange(cached, len(ids), device=device)[None])
    logits[:, -1].argmax(-1).tolist()
    return (clock(device) - start) * 1e3
