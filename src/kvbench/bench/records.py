"""results.jsonl: one JSON record per measured trial, appended and flushed one at a time.

A crash loses at most the record being written. On resume the file is read back; a line that is
not valid JSON (or not UTF-8) is reported with its number (the good records are kept, and `repair`
drops it). A measurement recorded twice (two runs on one OUT before runs locked it) counts once: the
first record of each (point, trial) is kept and the others are dropped with a warning.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvbench.errors import KvbenchError

RESULTS = "results.jsonl"
RUN_INFO = "run.json"


class CorruptResults(KvbenchError):
    pass


def read_run_info(out: Path) -> dict:
    """OUT/run.json, or {} when there is none; a corrupt one is a one-line error."""
    path = out / RUN_INFO
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise KvbenchError(f"{path} is corrupt (not a JSON object); restore it, or delete it and rerun with --resume "
                           "to write it again")
    return info


def run_kind(out: Path) -> str:
    """What wrote OUT, from its run.json: "suite", "reuse", "traffic" or "load" (a suite's run.json from before
    runs recorded their kind has none). Never guessed from the records: without run.json it is a one-line error."""
    if not (out / RUN_INFO).exists():
        raise KvbenchError(f"{out} has no {RUN_INFO}, which says what kind of run wrote it and on what; give the --out "
                           f"of a kvbench run or kvbench load, or restore its {RUN_INFO}")
    return read_run_info(out).get("kind", "suite")


def read_records(path: Path, strict: bool = True) -> list[dict]:
    """All records of a results file, each measurement once; with strict=False, corrupt lines are skipped."""
    records, bad = [], []
    if not path.exists():
        return records
    with open(path, "rb") as fh:  # bytes: a line that is not UTF-8 is one bad line, not a crash
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                bad.append(number)
                continue
            records.append(record)
    if bad and strict:
        raise CorruptResults(
            f"{path} line {bad[0]} is not a valid JSON record ({len(bad)} bad line(s), {len(records)} good "
            "records kept); fix or delete that line, or rerun with --repair to drop bad lines"
        )
    return _measured_once(path, records)


def _measured_once(path: Path, records: list[dict]) -> list[dict]:
    """The first record of each measurement: (point, trial, warmup, request_index of a reuse sequence, index of a
    load request); records without a point (load runs from before points) are kept as they are."""
    seen, kept = set(), []
    for record in records:
        if "point" in record:
            key = tuple(record.get(f) for f in ("point", "trial", "warmup", "request_index", "index"))
            if key in seen:
                continue
            seen.add(key)
        kept.append(record)
    if len(kept) < len(records):
        print(f"kvbench: warning: {path} records {len(records) - len(kept)} measurement(s) twice (two runs on one "
              "--out?); each counts once, the first record kept (--repair drops the others)", file=sys.stderr)
    return kept


def repair(path: Path, keep: Callable[[dict], bool] = lambda record: True) -> int:
    """Rewrite the file (atomically) without its corrupt lines, its repeated measurements and the records
    `keep` rejects; returns how many lines were dropped."""
    good = [r for r in read_records(path, strict=False) if keep(r)]
    total = sum(1 for line in open(path, "rb") if line.strip())
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in good))
    return total - len(good)


class ResultsWriter:
    """Appends records; each is one write of one line, flushed and fsynced before returning."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give; mkstemp makes it private (0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
