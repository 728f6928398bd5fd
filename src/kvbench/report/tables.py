"""Markdown tables and the cell formats every report shares: a number, mean ± std, percentiles.

A cell without a value (no sample, NaN, None) is an en dash, so a missing statistic is never shown as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from kvbench.bench.metrics import Summary

DASH = "–"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table; every row must have one cell per header."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under {len(header)} headers: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def num(x: float | int | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:.{digits}f}"


def mean_std(s: Summary, digits: int = 1) -> str:
    """`mean ± std` (std over the samples, ddof=1; a single sample shows its mean alone)."""
    if not s.n:
        return DASH
    return num(s.mean, digits) if s.n == 1 else f"{num(s.mean, digits)} ± {num(s.std, digits)}"


def pcts(s: Summary, digits: int = 1, which: Sequence[str] = ("p50", "p90", "p99")) -> str:
    """Percentiles from raw samples, `p50 / p90 / p99` by default."""
    if not s.n:
        return DASH
    return " / ".join(num(getattr(s, p), digits) for p in which)


def ratio(x: float | None, digits: int = 2) -> str:
    """A speedup or ratio, `2.55x`."""
    cell = num(x, digits)
    return cell if cell == DASH else f"{cell}x"
