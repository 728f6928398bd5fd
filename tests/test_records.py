import json
import os
import stat

import pytest

from kvbench.bench.records import CorruptResults, atomic_write_text, read_records, repair


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """report.md and run.json are shared files, not private temporaries (mkstemp alone makes them 0600)."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "text")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").read_text() == "text"
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary left behind


def _write(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_a_line_that_is_not_utf8_is_a_bad_line_and_repair_drops_it(tmp_path):
    path = tmp_path / "results.jsonl"
    _write(path, [json.dumps({"point": "a", "trial": 0}).encode(), b'{"point": "\xff\xfe", "trial": 1}',
                  json.dumps({"point": "a", "trial": 2}).encode()])
    with pytest.raises(CorruptResults, match="line 2 is not a valid JSON record .*2 good records kept"):
        read_records(path)
    assert [r["trial"] for r in read_records(path, strict=False)] == [0, 2]
    assert repair(path) == 1
    assert [r["trial"] for r in read_records(path)] == [0, 2]


def test_a_measurement_recorded_twice_counts_once(tmp_path, capsys):
    """Two runs on one --out (before runs locked it) wrote trials twice: n must stay the number of trials."""
    suite = [{"point": "p", "trial": t, "warmup": w, "ttft_ms": 10.0 + t} for w, t in ((True, 0), (False, 0), (False, 1))]
    reuse = [{"point": "q", "trial": 0, "warmup": False, "request_index": i} for i in (0, 1)]
    load = [{"request_rate": "inf", "index": 0}]
    twice = [dict(r, ttft_ms=99.0) if "ttft_ms" in r else r for r in suite + reuse]
    path = tmp_path / "results.jsonl"
    _write(path, [json.dumps(r).encode() for r in suite + reuse + load + load + twice])
    assert read_records(path) == suite + reuse + load + load  # the first of each kept; load records have no point
    assert "records 5 measurement(s) twice" in capsys.readouterr().err
    assert repair(path) == 5
    assert read_records(path) == suite + reuse + load + load
