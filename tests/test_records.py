import os
import stat

from kvbench.bench.records import atomic_write_text


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
