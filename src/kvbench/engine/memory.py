"""Peak memory per generation phase (prefill, decode), with the kind of figure named.

- CUDA: `torch.cuda.max_memory_allocated`, reset at each phase start.
- MPS: the driver's allocated memory, read at phase ends (the driver keeps no peak).
- CPU on Linux: the kernel's exact peak resident set (VmHWM), reset through /proc/self/clear_refs.
- CPU elsewhere: resident set sampled by a background thread every millisecond.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import psutil
import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _linux_hwm_available() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        _CLEAR_REFS.write_text("5")
        return "VmHWM" in _STATUS.read_text()
    except OSError:
        return False


class PhaseMemory:
    """Context manager; call `phase(name)` at each phase start. `peaks` maps phase -> peak bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, int] = {}
        self._phase: str | None = None
        self._hwm = device.type == "cpu" and _linux_hwm_available()
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0
        self.kind = {
            "cuda": "cuda_max_memory_allocated",
            "mps": "mps_driver_allocated",
        }.get(device.type, "cpu_peak_rss_vmhwm" if self._hwm else "cpu_peak_rss_sampled")

    def __enter__(self) -> PhaseMemory:
        if self.kind == "cpu_peak_rss_sampled":
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._close_phase()
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()

    def phase(self, name: str) -> None:
        self._close_phase()
        self._phase = name
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._hwm:
            _CLEAR_REFS.write_text("5")
        else:
            self._sampled_peak = psutil.Process().memory_info().rss

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    def _close_phase(self) -> None:
        if self._phase is None:
            return
        if self.kind == "cuda_max_memory_allocated":
            value = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "mps_driver_allocated":
            value = torch.mps.driver_allocated_memory()
        elif self._hwm:
            value = int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024
        else:
            value = max(self._sampled_peak, psutil.Process().memory_info().rss)
        self.peaks[self._phase] = value
        self._phase = None

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(0.001):
            self._sampled_peak = max(self._sampled_peak, proc.memory_info().rss)
