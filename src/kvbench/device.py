"""Device and dtype selection, and the one place that synchronises before a clock reading."""

from __future__ import annotations

import time

import torch

from kvbench.errors import KvbenchError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise KvbenchError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KvbenchError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise KvbenchError("device 'mps' requested but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (half-precision matmuls are slow on most CPUs), bfloat16 on CUDA, float16 on MPS."""
    if name not in DTYPES:
        raise KvbenchError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name != "auto":
        return DTYPES[name]
    return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def clock(device: torch.device) -> float:
    """Monotonic seconds, read only after queued device work has finished."""
    synchronize(device)
    return time.perf_counter()
