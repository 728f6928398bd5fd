"""results.jsonl: one JSON record per measured trial, appended and flushed one at a time.

A crash loses at most the record being written (a writer with `max_pending`, as `kvbench load` uses: at
most that many records, see ResultsWriter). On resume the file is read back; a line that is
not valid JSON (or not UTF-8) is reported with its number (the good records are kept, and `repair`
drops it). A measurement recorded twice (two runs on one OUT before runs locked it) counts once: the
first record of each (point, trial) is kept and the others are dropped with a warning.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import tempfile
import threading
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
    """Appends records, one line each.

    By default each append is written, flushed and fsynced before it returns: a crash loses at most the record
    being written. With `max_pending=N`, appends only queue the line and return (microseconds: an event loop
    that sends requests on schedule cannot wait 3-13 ms for each fsync); a thread writes whatever has queued
    in one write, then fsyncs, over and over. At most N records are ever appended and not yet fsynced (an
    append waits while N are), so a crash loses at most N records, in practice only those queued since the
    last fsync began (a few ms of records: one fsync takes 3-13 ms on this project's disk). close() writes and
    fsyncs every one; a write error is raised by the next append or by close().
    """

    def __init__(self, path: Path, max_pending: int | None = None):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")
        self._queue: queue.SimpleQueue[str | None] | None = None
        self._error: BaseException | None = None
        if max_pending is not None:
            if max_pending < 1:
                raise ValueError(f"max_pending must be >= 1, got {max_pending}")
            self._pending = threading.BoundedSemaphore(max_pending)  # one per record not yet fsynced
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._drain, name="kvbench-results-writer", daemon=True)
            self._thread.start()

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._queue is None:
            self._write(line)
            return
        self._raise_error()
        self._pending.acquire()
        self._queue.put(line)

    def _write(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _drain(self) -> None:
        done = False
        while not done:
            lines = [self._queue.get()]
            while not self._queue.empty():  # everything queued meanwhile goes into the same write and fsync
                lines.append(self._queue.get())
            done = lines[-1] is None
            records = [line for line in lines if line is not None]
            try:
                if self._error is None:
                    self._write("".join(records))
            except BaseException as exc:  # noqa: BLE001  (raised in the appending thread)
                self._error = exc
            for _ in records:
                self._pending.release()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise KvbenchError(f"cannot write {self.path}: {self._error}; the records before it are kept")

    def close(self) -> None:
        try:
            if self._queue is not None:
                self._queue.put(None)
                self._thread.join()
                self._raise_error()
        finally:
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
