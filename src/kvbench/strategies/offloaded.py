"""KV kept off the compute device and moved to it one layer at a time.

On CUDA this is transformers' own offloaded DynamicCache (CPU copies, next layer prefetched on a
side stream). Elsewhere there is no separate device to offload to: the same per-layer move runs
with host memory on both sides, as a functional check of the code path, and the run says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from kvbench.errors import NotEngaged
from kvbench.strategies import register
from kvbench.strategies.base import CacheStrategy, tensor_bytes


class HostOffloadedLayer(DynamicLayer):
    """A DynamicLayer whose stored keys/values live on the CPU between uses."""

    def __init__(self):
        super().__init__()
        self.round_trips = 0  # updates that brought the stored KV in and put it back (the mechanism checked)
        self.bytes_in = 0  # stored keys and values brought to the compute device, summed over updates

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.round_trips += 1
        self.bytes_in += tensor_bytes(self.keys, self.values)
        keys = torch.cat([self.keys.to(key_states.device), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.device), value_states], dim=-2)
        self.keys, self.values = keys.to("cpu"), values.to("cpu")
        return keys, values

    def bytes_moved(self) -> int:
        return self.bytes_in


@register
@dataclass
class Offloaded(CacheStrategy):
    name = "offloaded"
    summary = "KV stored on the CPU, moved to the compute device per layer (transformers offloading on CUDA)"

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        if lm.device.type == "cuda":
            return DynamicCache(config=lm.config, offloading=True)
        return Cache(layers=[HostOffloadedLayer() for _ in range(lm.config.num_hidden_layers)])

    def check_engaged(self, cache) -> None:
        if isinstance(cache, DynamicCache):  # transformers' offloading (CUDA)
            # it keeps sliding-window layers resident, and the one layer prefetched for the next step
            offloadable = [i for i, layer in enumerate(cache.layers) if layer.is_initialized and not layer.is_sliding]
            resident = [i for i in offloadable if cache.layers[i].keys.device.type != "cpu"]
            if not cache.offloading or len(resident) > 1:
                raise NotEngaged(f"offloaded: layers {', '.join(map(str, resident))} kept their KV on the compute "
                                 "device; nothing was offloaded")
            return
        idle = [i for i, layer in enumerate(cache.layers) if layer.is_initialized and not layer.round_trips]
        if idle or any(layer.keys.device.type != "cpu" for layer in cache.layers if layer.is_initialized):
            raise NotEngaged(f"offloaded: layers {', '.join(map(str, idle)) or 'some'} never moved their KV through "
                             "the host")

    def notes(self, device):
        if device.type == "cuda":
            return []
        return [
            f"offloaded on {device.type}: there is no separate device to offload to, so KV moves "
            "host-to-host; this runs the offload code path as a functional check, not a memory saving"
        ]
