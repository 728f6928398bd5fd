"""The tested dependency ranges: read from kvbench's own requirements, recorded, and warned about in one line."""

import json

from kvbench import versions
from kvbench.cli import main


def test_tested_ranges_are_the_declared_requirements():
    ranges = versions.tested_ranges()
    assert ranges["transformers"].startswith(">=5.23") and "<=" in ranges["transformers"]
    assert "torch" in ranges


def test_the_installed_versions_are_tested():
    assert versions.untested() == []


def test_an_untested_transformers_gives_one_line_naming_the_range(monkeypatch):
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda p: "5.99.0" if p == "transformers" else real(p))
    lines = versions.untested()
    assert len(lines) == 1
    assert lines[0].startswith("transformers 5.99.0 is untested") and versions.tested_ranges()["transformers"] in lines[0]


def test_the_cli_prints_it_once_as_one_line_and_run_json_records_it(tmp_path, monkeypatch, capsys, tiny_suite):
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda p: "5.99.0" if p == "transformers" else real(p))
    versions.warn_untested.cache_clear()
    try:
        assert main(["run", str(tiny_suite), "--quick", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    finally:
        versions.warn_untested.cache_clear()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "untested" in line]
    assert len(warnings) == 1 and warnings[0].startswith("kvbench: warning: transformers 5.99.0 is untested")
    env = json.loads((tmp_path / "out" / "run.json").read_text())["environment"]
    assert env["versions"]["transformers"] == "5.99.0" and len(env["untested_versions"]) == 1
