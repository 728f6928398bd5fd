"""What a run was measured on: versions, device, CPU/GPU name, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import kvbench

if TYPE_CHECKING:  # imported by describe(): describe_host() serves the load client, which runs without torch
    import torch


def describe_host() -> dict:
    """The client side of a run: versions, CPU and commit, without importing torch."""
    return {
        "python": platform.python_version(),
        "kvbench": kvbench.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }


def describe(device: torch.device) -> dict:
    import torch
    import transformers

    from kvbench.versions import untested, versions

    return {
        **describe_host(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "versions": versions(),
        "untested_versions": untested(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": _device_name(device),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_name()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(kvbench.__file__).parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
