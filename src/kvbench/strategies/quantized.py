"""KIVI-style quantized KV cache, in plain PyTorch so it runs on every device.

Keys are quantized per channel (min/max over a group of `group_size` tokens), values per token (min/max
over groups of `group_size` channels), both asymmetric with fp16 scale and zero point, codes packed
into bytes (two 4-bit or four 2-bit codes per byte). Full precision is kept where quantization hurts:
the first `sink_tokens` (attention sinks) and a residual window of the most recent tokens, which is
flushed into the quantized store a group at a time. The prompt is quantized only after prefill
attention ran in full precision (the prefill/decode boundary), never before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from kvbench.errors import KvbenchError, NotEngaged
from kvbench.strategies import register
from kvbench.strategies.base import Capabilities, CacheStrategy, tensor_bytes

SUPPORTED_BITS = (8, 4, 2)
FLOAT_DTYPES: dict[str, torch.dtype | None] = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] of `bits` each into bytes [..., d * bits / 8]."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    grouped = codes.view(*codes.shape[:-1], -1, per_byte)
    packed = grouped[..., 0].clone()
    for i in range(1, per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * i)) & mask for i in range(per_byte)], dim=-1).flatten(-2)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization with min/max taken along `dim`: (codes uint8, scale fp16, zero fp16).

    Scale and zero are rounded to fp16 before the codes are computed, so dequantization with the
    stored values is exactly what the codes were made for.
    """
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True).float(), x.amax(dim, keepdim=True).float()
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).clamp(min=1e-5).to(torch.float16)
    codes = ((x.float() - zero.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, zero


class QuantizedLayer(DynamicLayer):
    """One layer's KV: full-precision sinks | quantized body | full-precision residual window.

    `float_dtype` stores the sinks and the residual window (None: the model's dtype).
    """

    def __init__(self, bits: int, group_size: int, residual: int, sink_tokens: int,
                 float_dtype: torch.dtype | None = None):
        super().__init__()
        self.bits, self.group, self.residual, self.sinks = bits, group_size, residual, sink_tokens
        self.float_dtype = float_dtype
        self.sink_k = self.sink_v = self.recent_k = self.recent_v = None
        # Body: codes [b, h, n, d * bits / 8]; key scale/zero [b, h, n / group, d]; value scale/zero [b, h, n, d / vgroup]
        self.key_codes = self.key_scale = self.key_zero = None
        self.value_codes = self.value_scale = self.value_zero = None
        self.body_tokens = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.compute_dtype = key_states.dtype  # what attention gets back (transformers >= 5.24 keeps no layer dtype)
            self.value_group = min(self.group, key_states.shape[-1])
            self.stored = self.float_dtype or key_states.dtype
            n = key_states.shape[-2]
            s = min(self.sinks, n)
            self.sink_k, self.sink_v = self._store(key_states[:, :, :s]), self._store(value_states[:, :, :s])
            self.recent_k, self.recent_v = self._store(key_states[:, :, s:]), self._store(value_states[:, :, s:])
            self._flush()
            return key_states, value_states  # prefill attends in full precision
        self.recent_k = torch.cat([self.recent_k, self._store(key_states)], dim=-2)
        self.recent_v = torch.cat([self.recent_v, self._store(value_states)], dim=-2)
        self._flush()
        return self._full()

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        """A copy in the storage dtype of the full-precision parts."""
        return x.to(self.stored, copy=True)

    def _flush(self) -> None:
        """Move whole groups from the residual window into the quantized body, keeping >= `residual` recent."""
        movable = (self.recent_k.shape[-2] - self.residual) // self.group * self.group
        if movable <= 0:
            return
        k, v = self.recent_k[:, :, :movable], self.recent_v[:, :, :movable]
        self.recent_k, self.recent_v = self.recent_k[:, :, movable:].clone(), self.recent_v[:, :, movable:].clone()
        b, h, n, d = k.shape
        kc, ks, kz = quantize(k.reshape(b, h, n // self.group, self.group, d), self.bits, dim=3)
        vc, vs, vz = quantize(v.reshape(b, h, n, d // self.value_group, self.value_group), self.bits, dim=4)
        new = {
            "key_codes": pack(kc.reshape(b, h, n, d), self.bits), "key_scale": ks.squeeze(3), "key_zero": kz.squeeze(3),
            "value_codes": pack(vc.reshape(b, h, n, d), self.bits), "value_scale": vs.squeeze(4),
            "value_zero": vz.squeeze(4),
        }
        for name, tensor in new.items():
            old = getattr(self, name)
            setattr(self, name, tensor if old is None else torch.cat([old, tensor], dim=2))
        self.body_tokens += n

    def _dequantized_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n = self.key_codes.shape[:3]
        d = self.recent_k.shape[-1]
        kc = unpack(self.key_codes, self.bits).view(b, h, n // self.group, self.group, d)
        dtype = self.compute_dtype
        k = kc.to(dtype) * self.key_scale.unsqueeze(3).to(dtype) + self.key_zero.unsqueeze(3).to(dtype)
        vc = unpack(self.value_codes, self.bits).view(b, h, n, d // self.value_group, self.value_group)
        v = vc.to(dtype) * self.value_scale.unsqueeze(4).to(dtype) + self.value_zero.unsqueeze(4).to(dtype)
        return k.view(b, h, n, d), v.view(b, h, n, d)

    def _full(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [self.sink_k.to(self.compute_dtype)], [self.sink_v.to(self.compute_dtype)]
        if self.body_tokens:
            k, v = self._dequantized_body()
            keys.append(k)
            values.append(v)
        keys.append(self.recent_k.to(self.compute_dtype))
        values.append(self.recent_v.to(self.compute_dtype))
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_k.shape[-2] + self.body_tokens + self.recent_k.shape[-2]

    def expected_body_tokens(self) -> int:
        """Tokens that must be quantized by now: every whole group between the sinks and the residual window."""
        if not self.is_initialized:
            return 0
        return max(0, self.get_seq_length() - self.sink_k.shape[-2] - self.residual) // self.group * self.group

    def nbytes(self) -> int:
        return tensor_bytes(self.sink_k, self.sink_v, self.recent_k, self.recent_v, self.key_codes, self.key_scale,
                            self.key_zero, self.value_codes, self.value_scale, self.value_zero)


@register
@dataclass
class Quantized(CacheStrategy):
    name = "quantized"
    summary = "KIVI-style: keys per channel, values per token, int8/int4/int2 with full-precision sinks and recent window"
    # A batch's left padding would be kept as sinks and enter the groups' min/max: one sequence at a time.
    capabilities: ClassVar[Capabilities] = Capabilities(lossless=False, supports_batching=False)

    bits: int = 8
    group_size: int = 64
    residual: int = 32
    sink_tokens: int = 4
    float_dtype: str = "model"  # storage of the sinks and residual window: the model's dtype, or float16 as KIVI

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise KvbenchError(f"bits {self.bits} not supported by quantized; valid: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size <= 0:
            raise KvbenchError(f"group_size must be > 0, got {self.group_size}")
        if self.residual < 0 or self.sink_tokens < 0:
            raise KvbenchError("residual and sink_tokens must be >= 0")
        if self.float_dtype not in FLOAT_DTYPES:
            raise KvbenchError(f"float_dtype {self.float_dtype!r} not supported; valid: {', '.join(FLOAT_DTYPES)}")

    def check_engaged(self, cache) -> None:
        for index, layer in enumerate(cache.layers):
            expected = layer.expected_body_tokens()
            codes = 0 if layer.key_codes is None else layer.key_codes.shape[-2]
            if layer.body_tokens != expected or codes != expected:
                raise NotEngaged(
                    f"quantized holds {codes} quantized tokens in layer {index} where {expected} must be quantized by "
                    "now; the run would measure a float cache"
                )

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
        value_group = min(self.group_size, head_dim)
        if head_dim % value_group or value_group * self.bits % 8:
            raise KvbenchError(
                f"group_size {self.group_size} does not divide head_dim {head_dim} of {lm.name} into whole "
                "byte-packable groups; use a divisor of head_dim such as 32 or 64"
            )
        return Cache(layers=[QuantizedLayer(self.bits, self.group_size, self.residual, self.sink_tokens,
                                            FLOAT_DTYPES[self.float_dtype])
                             for _ in range(lm.config.num_hidden_layers)])
