"""`kvbench compare DIR1 DIR2 ...`: several runs side by side in one markdown table.

Each run's kind gives its rows (`compare_rows`), each described by dims: a suite point by prompt and
output tokens, strategy and batch; a load rate by prompt and output tokens and the rate. Rows align
on the dims that every run has (a suite run in-process and a load run against a server: prompt and
output tokens); the other dims name the row within its run. Where several rows of two runs share the
aligned dims, every pairing gets a line, each naming its rows. A run without a row there shows dashes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.report import kind_module
from kvbench.report.run import Row, Run, read_run
from kvbench.report.tables import DASH, table


def compare(outs: list[Path]) -> str:
    """The markdown text comparing the runs in `outs`."""
    if len(outs) < 2:
        raise KvbenchError("kvbench compare needs two run directories or more, e.g. kvbench compare results/a results/b")
    runs = [read_run(out) for out in outs]
    labels = _labels(outs)
    rows = [kind_module(run).compare_rows(run) for run in runs]
    common = [d for d in dict.fromkeys(d for rs in rows for r in rs for d in r.dims)
              if all(d in r.dims for rs in rows for r in rs)]
    variants = [any(_variant(r, common) for r in rs) for rs in rows]
    columns = [list(dict.fromkeys(c for r in rs for c in r.values)) for rs in rows]
    header = list(common)
    for label, has_variant, cols in zip(labels, variants, columns):
        header += ([f"{label}: row"] if has_variant else []) + [f"{label}: {c}" for c in cols]
    by_key: dict[tuple, list[list[Row]]] = {}
    for i, rs in enumerate(rows):
        for r in rs:
            by_key.setdefault(tuple(r.dims[d] for d in common), [[] for _ in runs])[i].append(r)
    lines = []
    for key in sorted(by_key, key=_sort_key):
        for combination in itertools.product(*(found or [None] for found in by_key[key])):
            cells = list(key)
            for row, has_variant, cols in zip(combination, variants, columns):
                if has_variant:
                    cells.append(_variant(row, common) if row else DASH)
                cells += [row.values.get(c, DASH) if row else DASH for c in cols]
            lines.append(cells)
    legend = [f"- **{label}**: `{out}`: {run.kind} run {run.name!r}{_what(run)}" for label, out, run in zip(labels, outs, runs)]
    aligned = ", ".join(common) if common else "nothing (the runs share no dimension: every pairing is listed)"
    return "\n".join([
        "# kvbench compare", "", *legend, "",
        f"Rows align on {aligned}; `row` names each run's own row where it has more dimensions. p50 / p99 over "
        "each row's requests; throughputs as each run's report defines them.", "",
        *table(header, lines),
    ]) + "\n"


def _labels(outs: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [out.name or str(out) for out in outs]
    return [name if names.count(name) == 1 else str(out) for name, out in zip(names, outs)]


def _variant(row: Row, common: list[str]) -> str:
    return ", ".join(f"{d} {v}" for d, v in row.dims.items() if d not in common)


def _what(run: Run) -> str:
    models = list((run.info.get("models") or {}))
    server = (run.info.get("server") or {}).get("model")
    return f" on {', '.join(models)}" if models else f" against server model {server}" if server else ""


def _sort_key(key: tuple) -> tuple:
    """Numbers in numeric order (64 before 128), text after them."""
    out = []
    for value in key:
        try:
            out.append((0, float(value), ""))
        except ValueError:
            out.append((1, 0.0, value))
    return tuple(out)
