"""transformers' own QuantizedCache (quanto, HQQ and fp8 backends), measured as a peer of `quantized`.

Unlike kvbench's `quantized`, transformers quantizes the whole prompt at prefill (attention sinks
included) and re-quantizes the whole cache whenever its residual window of `residual` full-precision
tokens fills up; quanto and HQQ quantize along the axis they are given with `group_size`, fp8 keeps
one scale per tensor. Comparing both shows what those choices cost in quality and speed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from transformers import QuantizedCache

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.strategies import register
from kvbench.strategies.base import Capabilities, CacheStrategy, tensor_bytes

# backend -> (package it needs, pip name, bits it accepts; () = fixed format, no `bits`)
BACKENDS: dict[str, tuple[str | None, str | None, tuple[int, ...]]] = {
    "quanto": ("optimum.quanto", "optimum-quanto", (2, 4)),
    "hqq": ("hqq", "hqq", (1, 2, 3, 4, 8)),
    "fp8": (None, None, ()),
}


@register
@dataclass
class HfQuantized(CacheStrategy):
    name = "hf_quantized"
    summary = "transformers' QuantizedCache as a peer: quanto int2/int4, HQQ, or fp8 (whole prompt quantized)"
    # A batch's left padding would be quantized with the real tokens (fp8: one scale for the whole batch).
    capabilities: ClassVar[Capabilities] = Capabilities(lossless=False, supports_batching=False)

    backend: str = "fp8"
    bits: int | None = None  # None: 4 for quanto and HQQ; fp8 takes none
    group_size: int = 64
    residual: int = 128

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise KvbenchError(f"unknown hf_quantized backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        valid_bits = BACKENDS[self.backend][2]
        if not valid_bits and self.bits is not None:
            raise KvbenchError(f"backend {self.backend} has a fixed format; leave bits unset")
        if valid_bits and self.bits is None:
            self.bits = 4
        if valid_bits and self.bits not in valid_bits:
            raise KvbenchError(
                f"bits {self.bits} not supported by backend {self.backend}; valid: {', '.join(map(str, valid_bits))}"
            )
        if self.group_size <= 0 or self.residual <= 0:
            raise KvbenchError("group_size and residual must be > 0")

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        module, pip_name, _ = BACKENDS[self.backend]
        if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            raise KvbenchError(
                f"hf_quantized backend {self.backend} needs the {pip_name} package: pip install {pip_name} "
                "(or pip install 'kvbench[peers]'); backend fp8 needs nothing extra"
            )
        if self.backend == "fp8":
            return QuantizedCache("fp8", lm.config)
        return QuantizedCache(self.backend, lm.config, nbits=self.bits, q_group_size=self.group_size,
                              residual_length=self.residual)

    def check_engaged(self, cache) -> None:
        # transformers quantizes the whole prompt on the first update: any filled layer holds quantized states.
        if any(layer.is_initialized and getattr(layer, "_quantized_keys", None) is None for layer in cache.layers):
            raise NotEngaged(f"hf_quantized ({self.backend}) holds no quantized keys; the run would measure a float cache")

    def kv_bytes(self, cache) -> int:
        # transformers keeps the quantized states in private attributes; there is no public accessor.
        return sum(tensor_bytes(layer.keys, layer.values, layer._quantized_keys, layer._quantized_values)
                   for layer in cache.layers)
