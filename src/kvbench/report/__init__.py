"""`kvbench report OUT`: one report for every kind of run, from OUT/run.json and OUT/results.jsonl only.

The kind comes from run.json; each kind has one module here that turns the records into its sections,
figures and one-line headline (`body`) and into rows that `kvbench compare` puts side by side
(`compare_rows`). Everything else (header, notes, failures, tables, figures, the atomic write) is shared
(`document`, `tables`, `figures`). Importing this package imports neither torch nor matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from kvbench.errors import KvbenchError
from kvbench.report import document, load, reuse, serve, suite, traffic
from kvbench.report.run import Run, read_run

KINDS: dict[str, ModuleType] = {"suite": suite, "reuse": reuse, "traffic": traffic, "load": load, "serve": serve}


def kind_module(run: Run) -> ModuleType:
    try:
        return KINDS[run.kind]
    except KeyError:
        raise KvbenchError(f"{run.out}/run.json names kind {run.kind!r}, which this kvbench cannot report; valid: "
                           f"{', '.join(KINDS)} (a newer kvbench wrote it?)") from None


def write_report(out: Path) -> Path:
    """Write OUT/report.md (and OUT/figures, and the kind's other files); returns report.md's path."""
    run = read_run(out)
    return document.write(run, kind_module(run).body(run, out / "figures"))


def one_line(out: Path) -> str:
    """The run's headline: the best speedup, the fastest point, each rate's latency..."""
    run = read_run(out)
    return kind_module(run).body(run, None).headline
