"""Refuse a sweep whose largest point would not fit in memory, before it can take the machine down.

The estimate is deliberately conservative: weights, the full KV cache of the largest point, and
prefill activations including one layer's attention-score matrix (the eager/masked SDPA path
materialises it; fused kernels need less).

It runs twice. Before any weights load, every model of the sweep is estimated from its config alone
(`read_shape`: parameters counted on the meta device) with the prompt lengths the suite fixes, so a
sweep that cannot fit is refused in seconds, before its first measurement. Prompts written as text
have no length until a tokenizer reads them: that first estimate counts only their new tokens, and
each model is estimated again once loaded, with its real prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from kvbench.bench.suite import Point
from kvbench.errors import KvbenchError
from kvbench.models import LoadedModel, kv_bytes_per_token, model_config
from kvbench.units import human_bytes

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GB', '512MiB', '1.5g' or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise KvbenchError(f"cannot read memory size {text!r}; write e.g. 8GB, 512MiB or 2000000000")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise KvbenchError(f"memory size {text!r} is under one byte; write e.g. 8GB, 512MiB or 2000000000")
    return size


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its config, dtype and the bytes of its weights."""

    name: str
    config: Any  # a transformers PretrainedConfig
    dtype: torch.dtype
    weight_bytes: int

    @classmethod
    def of(cls, lm: LoadedModel) -> ModelShape:
        return cls(lm.name, lm.config, lm.dtype, lm.weight_bytes)

    @property
    def context_window(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.dtype)


def read_shape(spec: str, dtype: torch.dtype) -> ModelShape:
    """A model's shape from its config alone: it is built on the meta device, so its parameters are
    counted (tied ones once) without allocating a byte of them."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return ModelShape(spec, config, dtype, sum(t.numel() * t.element_size() for t in tensors.values()))


@dataclass(frozen=True)
class Estimate:
    point: Point
    weights: int
    kv: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations


def estimate(lm: ModelShape, points: list[Point], prompt_tokens: dict[Point, int]) -> Estimate:
    """The largest estimate over the points of one model (`prompt_tokens` gives each point's length)."""
    cfg, size = lm.config, lm.dtype.itemsize
    worst = None
    for point in points:
        tokens = prompt_tokens[point] + point.output_tokens
        kv = point.batch_size * tokens * lm.kv_bytes_per_token
        hidden = point.batch_size * tokens * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * size
        scores = point.batch_size * cfg.num_attention_heads * tokens * tokens * size
        logits = point.batch_size * cfg.vocab_size * 4
        e = Estimate(point, lm.weight_bytes, kv, hidden + scores + logits)
        if worst is None or e.total > worst.total:
            worst = e
    return worst


def default_limit(held_bytes: int) -> int:
    """80% of the memory available now plus what this process already holds for the model (its loaded weights)."""
    return int(0.8 * (psutil.virtual_memory().available + held_bytes))


def check_context(lm: ModelShape, points: list[Point]) -> None:
    """Refuse a point whose fixed prompt length plus new tokens exceeds the model's context window."""
    for p in points:
        if p.prompt_tokens is not None and p.prompt_tokens + p.output_tokens > lm.context_window:
            raise KvbenchError(
                f"point {p.key}: a prompt of {p.prompt_tokens} tokens + {p.output_tokens} new tokens exceeds the "
                f"context window of {lm.name} ({lm.context_window} tokens); lower prompt_tokens or output_tokens"
            )


def check(e: Estimate, limit: int) -> None:
    if e.total <= limit:
        return
    p = e.point
    raise KvbenchError(
        f"refusing to run: the largest point ({p.key}) needs an estimated {human_bytes(e.total)} "
        f"(weights {human_bytes(e.weights)} + KV {human_bytes(e.kv)} + activations {human_bytes(e.activations)}), "
        f"over the memory limit of {human_bytes(limit)}. Shrink the sweep (fewer prompt_tokens, output_tokens or "
        "batch_sizes at the top end, or a smaller model) or raise --memory-limit if you know better"
    )
