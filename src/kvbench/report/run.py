"""A run directory as reports read it: its kind and provenance (run.json) and its records (results.jsonl).

Reports read only these two files. The kind comes from run.json, never from the records: a directory
without run.json is refused with a one-line error (`records.run_kind`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvbench.bench.metrics import timing_stats
from kvbench.bench.records import RESULTS, read_records, read_run_info, run_kind
from kvbench.errors import KvbenchError
from kvbench.report.tables import pcts


@dataclass(frozen=True)
class Run:
    out: Path
    kind: str  # "suite", "reuse", "traffic" or "load"
    info: dict  # run.json
    records: list[dict] = field(repr=False)  # every record, warmups included; each measurement once

    @property
    def name(self) -> str:
        """The spec's name (`suite` in run.json files before the one runner), or the directory's."""
        return self.info.get("name") or self.info.get("suite") or self.out.name

    @property
    def spec(self) -> dict:
        """The resolved spec (`config` in load runs before the one runner)."""
        return self.info.get("spec") or self.info.get("config") or {}

    @property
    def partial(self) -> bool:
        """Interrupted before every point was measured (`partial` in load runs before the one runner)."""
        return self.info.get("complete") is False or bool(self.info.get("partial", False))

    @property
    def measured(self) -> list[dict]:
        return [r for r in self.records if not r.get("warmup")]


def read_run(out: Path) -> Run:
    if not out.is_dir():
        raise KvbenchError(f"{out} is not a directory; run a suite first (kvbench run SUITE --out {out}) or "
                           f"kvbench load --out {out}")
    kind = run_kind(out)
    results = out / RESULTS
    if not results.exists():
        raise KvbenchError(f"{out} has no {RESULTS}; run a suite first (kvbench run SUITE --out {out}), or "
                           f"kvbench load --out {out}")
    records = read_records(results, strict=False)
    if not any(not r.get("warmup") for r in records):
        raise KvbenchError(f"{results} holds no measured records yet")
    return Run(out, kind, read_run_info(out), records)


@dataclass(frozen=True)
class Row:
    """One comparable line of a run for `kvbench compare`.

    `dims`: what the row measured (prompt and output tokens, a strategy, a request rate...); rows of
    two runs sit side by side where the dims both runs have are equal, and the others name the row.
    `values`: column name -> cell text, in display order."""

    dims: dict[str, str]
    values: dict[str, str]


def latency_values(records: list[dict]) -> dict[str, str]:
    """TTFT, TPOT, ITL (every gap pooled) and E2E p50 / p99 of some requests' records (the successful ones), as
    compare shows them."""
    stats = timing_stats(records)
    return {f"{name} ms p50 / p99": pcts(stats[field], digits, ("p50", "p99"))
            for name, field, digits in (("TTFT", "ttft_ms", 1), ("TPOT", "tpot_ms", 2), ("ITL", "itl_ms", 2),
                                        ("E2E", "e2e_ms", 1))}
