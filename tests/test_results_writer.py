"""ResultsWriter: every record durable before append returns, or, with max_pending, at most N not yet fsynced."""

import json
import threading

import pytest

from kvbench.bench import records
from kvbench.bench.records import ResultsWriter, read_records
from kvbench.errors import KvbenchError


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("max_pending", [None, 1, 64])
def test_every_record_is_written_once_in_order(tmp_path, max_pending):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path, max_pending=max_pending) as writer:
        for i in range(200):
            writer.append({"index": i})
    assert lines(path) == [{"index": i} for i in range(200)]
    assert read_records(path) == lines(path)


def test_without_max_pending_each_append_is_on_disk_when_it_returns(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(records.os, "fsync", lambda fd: synced.append(len(lines(tmp_path / "r.jsonl"))))
    with ResultsWriter(tmp_path / "r.jsonl") as writer:
        for i in range(3):
            writer.append({"index": i})
            assert synced[-1] == i + 1


class BlockedDisk:
    """os.fsync that waits until released, counting the records each call made durable."""

    def __init__(self, path):
        self.path, self.release, self.durable = path, threading.Event(), []

    def __call__(self, fd):
        self.release.wait(30)
        self.durable.append(len(lines(self.path)))


def test_an_append_waits_while_max_pending_records_are_not_yet_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    disk = BlockedDisk(path)
    monkeypatch.setattr(records.os, "fsync", disk)
    writer = ResultsWriter(path, max_pending=4)
    for i in range(4):
        writer.append({"index": i})  # returns at once: the first write's fsync is blocked, the rest queued
    over = threading.Thread(target=writer.append, args=({"index": 4},))
    over.start()
    over.join(0.5)
    assert over.is_alive()  # the fifth waits: four records are not yet durable
    disk.release.set()
    over.join(30)
    assert not over.is_alive()
    writer.close()
    assert lines(path) == [{"index": i} for i in range(5)]
    assert disk.durable[-1] == 5 and len(disk.durable) < 5  # queued records share a write and an fsync


def test_a_write_error_is_raised_to_the_caller_with_the_records_before_it_kept(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    real_fsync = records.os.fsync
    calls = []

    def failing(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", failing)
    writer = ResultsWriter(path, max_pending=1)  # one at a time: the first record has its own fsync
    writer.append({"index": 0})
    writer.append({"index": 1})
    with pytest.raises(KvbenchError, match="No space left on device; the records before it are kept"):
        writer.close()
    assert lines(path)[0] == {"index": 0}
