import multiprocessing

import torch

from kvbench.engine.memory import PhaseMemory


def _measure_phases(queue) -> None:
    with PhaseMemory(torch.device("cpu")) as mem:
        mem.phase("small")
        torch.ones(10)
        mem.phase("big")
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        big += 1
        del big
    queue.put((mem.peaks, mem.kind))


def test_phase_peaks_are_kept_apart():
    # A fresh process: the figure is a process-wide peak, so what earlier tests left resident in
    # this one (freed memory malloc keeps, model weights) must not blur the comparison.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_phases, args=(queue,))
    proc.start()
    peaks, kind = queue.get(timeout=120)
    proc.join()
    assert set(peaks) == {"small", "big"}
    assert peaks["big"] >= peaks["small"] + 48 * 2**20
    assert kind.startswith("cpu_peak_rss")
