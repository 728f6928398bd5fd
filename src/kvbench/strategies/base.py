"""The strategy interface: a small dataclass per cache mode, with capabilities the engine asks about.

The engine never switches on concrete strategy classes; it asks `capabilities` and calls
`make_cache` / `kv_bytes`. Fields of a strategy dataclass are its hyperparameters.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from transformers import Cache

    from kvbench.models import LoadedModel


@dataclass(frozen=True)
class Capabilities:
    uses_cache: bool = True  # False: every step recomputes the whole sequence
    lossless: bool = True  # greedy output must equal the full `dynamic` cache
    supports_batching: bool = True
    needs_attention_scores: bool = False


@dataclass
class CacheStrategy:
    """Base class. Subclasses set `name`, `summary`, `capabilities` and implement `make_cache`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def check_batch(self, batch_size: int) -> None:
        """Refuse a batch this strategy cannot run (asked by the engine, and by a sweep before it starts)."""
        if batch_size > 1 and not self.capabilities.supports_batching:
            raise KvbenchError(f"strategy {self.name!r} does not support batches yet; use batch size 1")

    def make_cache(self, lm: LoadedModel, batch_size: int, prompt_tokens: int, max_new_tokens: int) -> Cache | None:
        """A fresh cache for one generation: `batch_size` rows of `prompt_tokens` (padded) plus new tokens."""
        raise NotImplementedError

    def attach(self, lm: LoadedModel, cache: Cache | None) -> AbstractContextManager:
        """Hooks the strategy needs on the model during one generation; removed when the context exits."""
        return nullcontext()

    def kv_bytes(self, cache: Cache | None) -> int:
        """Exact bytes the cache holds: every tensor of every layer (allocated, not just used).

        Layers that store more than keys and values (quantized codes and scales, partial keys) count
        their own storage with an `nbytes()` method.
        """
        if cache is None:
            return 0
        return sum(
            layer.nbytes() if hasattr(layer, "nbytes") else tensor_bytes(layer.keys, layer.values)
            for layer in cache.layers
        )

    def token_bytes_bound(self, lm: LoadedModel) -> int:
        """At most the bytes one more token can add to this strategy's cache: full KV unless the strategy stores
        more per token (a true upper bound: the serving engine's per_seq backend admits requests on it)."""
        return lm.kv_bytes_per_token

    def bytes_moved(self, cache: Cache | None) -> int | None:
        """Bytes of keys and values brought from the offload side to the compute device so far, counted by the
        layers that move them (a `bytes_moved()` method); None for a strategy whose KV stays where it is used."""
        if cache is None or not any(hasattr(layer, "bytes_moved") for layer in cache.layers):
            return None
        return sum(layer.bytes_moved() for layer in cache.layers if hasattr(layer, "bytes_moved"))

    def check_engaged(self, cache: Cache | None) -> None:
        """Raise `NotEngaged` if the strategy's mechanism should have acted on this generation but did not.

        Called after every generation, so a strategy silently reduced to another (hooks that no longer
        fire, a fetch that gets no query) fails the measurement instead of producing a plausible record.
        The reference modes have no mechanism to check.
        """

    def notes(self, device: torch.device) -> list[str]:
        """Plain-language caveats for this device (printed and stored with the run)."""
        return []


def tensor_bytes(*held) -> int:
    """Bytes held by tensors, looked for inside tuples, lists and dicts; None and other values count nothing.

    Tensor subclasses that wrap storage (quantized tensors such as optimum-quanto's) are counted by
    their inner tensors (`__tensor_flatten__`), not by the logical shape they present.
    """
    total = 0
    for item in held:
        if hasattr(item, "__tensor_flatten__"):
            names, _ = item.__tensor_flatten__()
            total += tensor_bytes(*(getattr(item, name) for name in names))
        elif isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, (tuple, list)):
            total += tensor_bytes(*item)
        elif isinstance(item, dict):
            total += tensor_bytes(*item.values())
    return total
