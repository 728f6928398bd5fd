"""The one runner: every kind of run goes through `run(spec, options)`.

The runner owns what every kind shares: the output dir and its lock, --resume and --repair, run.json
provenance (spec, digest, environment, every part of a resumed run), dropping the records of a
(point, trial) cut mid-way, the order of measurement (warmups first, then trial by trial with the
compared points of a group taking turns, so drift of the machine spreads over all of them), the
progress bar, and a run.json that says whether the run completed (Ctrl-C keeps every record written).
A kind supplies only a `Session`: how to check its points before anything heavy, how to open a group
(load a model, reach a server) and how to measure one point.

Data flows one way: spec -> session (workload -> engine or server -> per-token timestamps ->
metrics) -> records; the report reads only the records and run.json.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from kvbench.bench import provenance
from kvbench.bench.outlock import locked, prepare_out_dir
from kvbench.bench.records import RESULTS, RUN_INFO, ResultsWriter, atomic_write_text, repair
from kvbench.bench.spec import RunSpec
from kvbench.errors import KvbenchError

Emit = Callable[[dict], None]


@dataclass(frozen=True)
class RunOptions:
    out: Path
    resume: bool = False
    repair: bool = False
    memory_limit: int | None = None  # bytes; None: 80% of available memory (in-process kinds)
    progress: bool = True


@dataclass(frozen=True)
class RunOutcome:
    out: Path
    measured: int  # (point, trial) pairs measured by this call
    skipped: int  # already measured by an earlier part
    notes: tuple[str, ...]


class Session(Protocol):
    """How one kind measures. Every record a session emits carries `point` (the point's key) and `trial`."""

    unit: str  # what the progress bar counts ("trial", "request")
    # None: every record fsynced before the next is measured; N: written in batches by a thread, at most N not yet
    # fsynced (a crash loses at most N; Ctrl-C none), for kinds that must not block on a disk (an HTTP send loop)
    max_unsynced_records: int | None

    def environment(self) -> dict:
        """What the run is measured on (kvbench.bench.environment); compared on resume."""

    def notes(self) -> list[str]:
        """Caveats for the report (e.g. a strategy that cannot run on this device)."""

    def records_per(self, point: Any) -> int:
        """Records one (point, trial) writes when complete; a (point, trial) with fewer was cut and is measured again."""

    def check(self, todo: list[tuple[Any, int]], measured: list[dict]) -> None:
        """Refuse now whatever would be refused later (context, memory, a server that is not there); `measured`:
        the complete records of earlier parts (a kind may compare against them)."""

    def groups(self, points: list[Any]) -> list[list[Any]]:
        """Points measured together, trial by trial in turn (the strategies compared at one shape)."""

    def open(self, group: list[Any]) -> dict:
        """Prepare a group (load its model); returns what run.json should say about it (merged into run.json; each
        entry of `models` with the `fingerprint` of its weights, checked against earlier parts')."""

    def warmup(self, group: list[Any], emit: Emit) -> None:
        """Untimed work before a group's first measurement; warmup records it keeps carry warmup=True."""

    def measure(self, point: Any, trial: int, emit: Emit) -> dict | None:
        """Measure one point once, emitting its records; returns run.json facts about it (run.json `points`)."""


def run(spec: RunSpec, options: RunOptions, session: Session | None = None) -> RunOutcome:
    """Measure every (point, trial) of `spec` not yet in OUT/results.jsonl (`session`: the kind's own by default)."""
    out = prepare_out_dir(options.out)
    with locked(out):
        return _run(spec, options, session or spec.session(options), out)


def _run(spec: RunSpec, options: RunOptions, session: Session, out: Path) -> RunOutcome:
    environment = session.environment()
    existing = provenance.start(out, spec.kind, options.resume, options.repair, spec, environment)
    points = spec.points()
    sizes = {p.key: session.records_per(p) for p in points}
    records = drop_cut(out / RESULTS, existing.records, sizes)
    done = {(r["point"], r["trial"]) for r in records if not r.get("warmup")}
    todo = [(p, t) for t in range(spec.trials) for p in points if (p.key, t) not in done]
    session.check(todo, records)
    notes = session.notes()
    info = {"kind": spec.kind, "name": spec.name, "spec": spec.to_dict(), "spec_digest": spec.digest(),
            "environment": environment, "models": dict(existing.info.get("models", {})),
            "points": dict(existing.info.get("points", {})), "notes": notes,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False}
    info["parts"] = provenance.parts(existing, info)
    save = lambda: atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2) + "\n")  # noqa: E731
    save()
    pending = defaultdict(list)
    for point, trial in todo:
        pending[point.key].append(trial)
    bar = tqdm(total=sum(sizes[p.key] for p, _ in todo), desc=spec.name, unit=session.unit,
               disable=not options.progress)
    try:
        with ResultsWriter(out / RESULTS, max_pending=session.max_unsynced_records) as writer:
            def emit(record: dict) -> None:
                writer.append(record)
                if not record.get("warmup"):
                    bar.update()

            for group in session.groups([p for p in points if pending[p.key]]):
                opened = session.open(group)
                for name, model in opened.get("models", {}).items():
                    provenance.check_model(out, existing, name, model["fingerprint"])
                for key, facts in opened.items():
                    info[key] = {**info.get(key, {}), **facts}
                save()
                bar.set_postfix_str("warmup")
                session.warmup(group, emit)
                for trial in range(spec.trials):
                    for point in group:
                        if trial in pending[point.key]:
                            bar.set_postfix_str(point.key)
                            facts = session.measure(point, trial, emit)
                            if facts:
                                info["points"].setdefault(point.key, {}).update(facts)
                                save()
        info["complete"] = True
    finally:
        bar.close()
        info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        save()
    return RunOutcome(out, len(todo), spec.trials * len(points) - len(todo), tuple(notes))


def drop_cut(path: Path, records: list[dict], sizes: dict[str, int]) -> list[dict]:
    """The records of complete (point, trial) pairs; those of a pair cut mid-way (a sequence of requests, a
    request rate) are dropped from `path`, so that it is measured again from its start and no report counts it
    twice. Records of points the spec does not have are refused (possible when run.json is gone)."""
    counts: dict[tuple[str, int], set] = defaultdict(set)
    for r in records:
        if not r.get("warmup"):  # a record's place in its measurement: request_index (reuse), index (load), none
            counts[(r["point"], r["trial"])].add(r.get("request_index", r.get("index")))
    foreign = sorted({point for point, _ in counts if point not in sizes})
    if foreign:
        raise KvbenchError(f"{path} holds records of points this spec does not have ({', '.join(foreign[:3])}); "
                           "resume with the spec and flags that wrote them, or choose another --out")
    cut = {key for key, seen in counts.items() if len(seen) < sizes[key[0]]}
    if not cut:
        return records
    dropped = repair(path, keep=lambda r: r.get("warmup") or (r["point"], r["trial"]) not in cut)
    print(f"kvbench: dropped {dropped} record(s) of {len(cut)} measurement(s) cut mid-way; they are measured again "
          "from their start")
    return [r for r in records if r.get("warmup") or (r["point"], r["trial"]) not in cut]
