import torch

from kvbench.engine.memory import PhaseMemory


def test_phase_peaks_are_kept_apart():
    with PhaseMemory(torch.device("cpu")) as mem:
        mem.phase("small")
        torch.ones(10)
        mem.phase("big")
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        big += 1
        del big
    assert set(mem.peaks) == {"small", "big"}
    assert mem.peaks["big"] >= mem.peaks["small"] + 48 * 2**20
    assert mem.kind.startswith("cpu_peak_rss")
