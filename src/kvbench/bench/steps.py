"""steps.jsonl: one line per engine step of a serve run (point, trial, `kvbench.serve.engine.StepStats`), beside
results.jsonl.

A (point, trial) writes all its steps in one append, fsynced, before its first record: a trial whose records
are complete always has its steps. A trial cut mid-way may have left steps behind; `keep_steps` drops them when
the run resumes (before it is measured again), and readers take steps only of trials whose records are complete
(`read_steps`). Torch-free: reports read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from kvbench.bench.records import atomic_write_text

STEPS = "steps.jsonl"


def append_steps(path: Path, steps: Iterable[dict]) -> None:
    """Append one trial's steps in one write, flushed and fsynced."""
    text = "".join(json.dumps(s) + "\n" for s in steps)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_steps(path: Path, complete: set[tuple[str, int]] | None = None) -> list[dict]:
    """The steps of `path`, of the (point, trial) pairs in `complete` only (None: all); unreadable lines skipped."""
    if not path.exists():
        return []
    steps = []
    with open(path, "rb") as fh:
        for line in fh:
            try:
                step = json.loads(line.decode("utf-8"))
            except ValueError:  # a line cut by a crash
                continue
            if isinstance(step, dict) and (complete is None or (step.get("point"), step.get("trial")) in complete):
                steps.append(step)
    return steps


def keep_steps(path: Path, complete: set[tuple[str, int]]) -> None:
    """Rewrite `path` (atomically) with the steps of the `complete` (point, trial) pairs only."""
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in read_steps(path, complete)))
