"""The output directory: writable, and one run at a time in it.

Two runs appending to one results.jsonl (two `--resume` started together) would each measure the
trials the other is measuring, and the report would count them twice. A run holds an exclusive
`flock` on OUT/.lock while it reads and writes OUT; the kernel releases it when the process ends,
however it ends, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvbench.errors import KvbenchError

LOCK = ".lock"


def prepare_out_dir(out: Path) -> Path:
    """Create OUT and check that it is writable, before anything is measured (torch-free: the load client uses it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".kvbench-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise KvbenchError(f"cannot write to output dir {out}: {exc.strerror or exc}; choose another --out") from None
    return out


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold OUT/.lock for the body; refuse with a one-line error while another run holds it."""
    path = out / LOCK
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise KvbenchError(f"another kvbench run (pid {holder}) is writing to {out}; wait for it to end, "
                               "or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock
