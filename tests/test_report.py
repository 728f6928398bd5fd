"""One report for every kind of run, and `kvbench compare`: hand-made run dirs (records + run.json) render
the numbers their records hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.report import one_line, write_report
from kvbench.report.compare import compare
from kvbench.report.reuse import break_even, mode_rows
from kvbench.report.traffic import stream_rows


def _run_dir(path: Path, info: dict | None, records: list[dict]) -> Path:
    path.mkdir()
    if info is not None:
        (path / "run.json").write_text(json.dumps(info))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _suite_record(strategy: str, trial: int, ttft: float, e2e: float, warmup: bool = False) -> dict:
    return {"suite": "hand", "point": f"{strategy}/p128/o32/b1", "strategy": strategy, "model": "m",
            "target_prompt_tokens": 128, "prompt_tokens": 128, "max_new_tokens": 32, "output_tokens": 32,
            "batch_size": 1, "trial": trial, "warmup": warmup, "ttft_ms": ttft, "e2e_ms": e2e, "tpot_ms": (e2e - ttft) / 31,
            "decode_ms": e2e - ttft, "decode_tokens_per_s": 31 / ((e2e - ttft) / 1000), "itl_ms": [(e2e - ttft) / 31] * 31,
            "kv_cache_bytes": 2**20, "peak_mem_bytes": 2**30, "mem_kind": "cpu_peak_rss_vmhwm"}


def _suite(path: Path, kind: str | None = "suite") -> Path:
    records = [_suite_record("dynamic", 0, 999.0, 9999.0, warmup=True)]
    records += [_suite_record("dynamic", t, ttft, e2e) for t, (ttft, e2e) in enumerate(((10, 100), (20, 200), (30, 300)))]
    records += [_suite_record("no_cache", t, 20, 400) for t in range(3)]
    info = {"suite": "hand", "spec": {"baseline": "no_cache", "description": "a hand-made suite"},
            "environment": {"device": "cpu", "device_name": "test CPU", "python": "3.11", "torch": "2.13",
                            "git_commit": "abc"},
            "models": {"m": {"dtype": "float32", "fingerprint": "f00"}}, "notes": ["a note"]}
    return _run_dir(path, info | ({"kind": kind} if kind else {}), records)


def _load_record(rate: str, index: int, ttft: float, status: str = "ok") -> dict:
    ok = status == "ok"
    return {"request_rate": rate, "index": index, "status": status, "sent_s": index * 0.5, "end_s": index * 0.5 + 1.0,
            "send_lag_ms": 1.0, "ttft_ms": ttft if ok else None, "itl_ms": [10.0] * 31 if ok else [],
            "tpot_ms": 10.0 if ok else None, "e2e_ms": ttft + 310 if ok else None, "prompt_tokens": 128,
            "output_tokens": 32 if ok else 0, "cached_tokens": None}


def _load(path: Path) -> Path:
    records = [_load_record("1", i, ttft) for i, ttft in enumerate((100.0, 200.0, 300.0))]
    records.append(_load_record("1", 3, 0, status="http_500"))
    info = {"kind": "load", "config": {"url": "http://x/v1", "endpoint": "completions", "slo": None,
                                       "workload": {"kind": "random", "prompt_tokens": 128, "output_tokens": 32}},
            "environment": {"python": "3.11", "kvbench": "0.1.0", "cpu": "test CPU", "cpu_count": 2, "git_commit": "abc"},
            "partial": False, "points": {"1": {"planned": 4}}, "server": {"model": "served"}}
    return _run_dir(path, info, records)


def test_a_suite_report_shows_spread_percentiles_and_speedups(tmp_path):
    out = _suite(tmp_path / "s")
    report = write_report(out).read_text()
    assert report.startswith("# kvbench report: hand\n\na hand-made suite\n")
    assert "- kind: suite\n- 6 measured trials over 2 points; 1 warmup runs excluded\n" in report
    assert "- note: a note" in report and "- device: cpu (test CPU)" in report
    # e2e 100/200/300: mean 200, std 100, p50 200, p90 280, p99 298 (linear interpolation); the warmup is excluded
    assert ("| dynamic/p128/o32/b1 | 3 | 128 | 32.0 | 20.0 ± 10.0 | 20.0 / 28.0 / 29.8 | 5.81 ± 2.90 | 5.81 / 8.71 "
            "| 200.0 ± 100.0 | 200.0 / 280.0 / 298.0 |") in report
    assert "| dynamic | 128 | 32 | 1 | 2.00x | 1.00x | 2.11x |" in report  # 400 / 200 end to end, 380 / 180 decode
    assert "![strategies](figures/strategies.png)" in report and (out / "figures" / "strategies.png").exists()
    assert one_line(out) == "2 points; best end-to-end speedup 2.00x (dynamic vs no_cache at prompt 128, 32 new tokens)"


def test_a_suite_run_json_from_before_runs_recorded_their_kind_is_a_suite(tmp_path):
    assert "- kind: suite" in write_report(_suite(tmp_path / "s", kind=None)).read_text()


def test_a_load_report_shows_each_rate_with_spread_and_its_failures(tmp_path):
    out = _load(tmp_path / "l")
    report = write_report(out).read_text()
    assert "- server: http://x/v1 (`/completions`), model `served`" in report
    assert "| 1 | 3 / 4 / 4 | 1.20 |" in report  # 3 ok over 2.5 s (the last request ends at 2.5 s)
    assert "| 200.0 ± 100.0 | 200.0 / 280.0 / 298.0 | 10.00 | 10.00 / 10.00 / 10.00 |" in report
    assert "## Failed requests\n\n| rate | reason | count |\n|---|---|---|\n| 1 | http_500 | 1 |" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["points"]["1"]["ttft_ms.p50"] == 200.0 and summary["points"]["1"]["failed"] == 1
    assert one_line(out).startswith("rate 1: 3/4 ok, 1.20 req/s, TTFT p50 200.0 ms")


def _reuse_record(workload, mode, index, ttft, trial=0, tier="ram", recompute=None, **extra):
    return {"workload": workload, "reuse_mode": mode, "recompute": recompute, "tier": tier if mode != "none" else "-",
            "trial": trial, "request_index": index, "ttft_ms": ttft, "prompt_tokens": 100, "reuse_ratio": 0.0,
            "greedy_match": True, **extra}


def test_speedup_is_against_none_on_the_same_warm_requests_and_break_even_per_tier():
    records = [_reuse_record("doc", "none", 0, 1000), _reuse_record("doc", "none", 1, 800),
               _reuse_record("doc", "none", 2, 1200), _reuse_record("doc", "prefix", 0, 1100),
               _reuse_record("doc", "prefix", 1, 100, floor_ms=50.0), _reuse_record("doc", "prefix", 2, 100, floor_ms=50.0)]
    for size, cold, ram, disk in ((64, 100, 120, 150), (256, 300, 150, 400), (1024, 900, 160, 300)):
        records += [_reuse_record(f"break-even-{size}", "none", i, cold) for i in (0, 1)]
        records += [_reuse_record(f"break-even-{size}", "prefix", 1, ram),
                    _reuse_record(f"break-even-{size}", "prefix", 1, disk, tier="disk")]
    rows = {(r["workload"], r["mode"], r["tier"]): r for r in mode_rows(records)}
    prefix = rows[("doc", "prefix", "ram")]
    assert prefix["speedup"] == pytest.approx(10.0) and prefix["warm_over_floor"] == pytest.approx(2.0)
    assert prefix["cold_ttft_ms"].mean == 1100
    none = rows[("doc", "none", "-")]["warm_ttft_ms"]  # warm requests 800 and 1200 ms: their spread is kept
    assert (none.n, none.mean, none.p50, none.std) == (2, 1000, 1000, pytest.approx(282.84, abs=0.01))
    assert none.p90 == pytest.approx(1160)
    assert break_even(mode_rows(records)) == {"ram": 256, "disk": 1024}


def test_stream_rows_keep_the_spread_of_hit_and_miss_ttft():
    records = [{"stream": "zipf", "trial": 0, "request_index": i, "hit": hit, "ttft_ms": ttft, "reuse_ratio": 0.5 * hit,
                "tier_tokens": {"ram": 10, "disk": 30} if hit else {}, "ram_bytes": i, "disk_bytes": 2 * i, "evictions": i}
               for i, (hit, ttft) in enumerate([(False, 900.0), (True, 100.0), (True, 300.0), (False, 1100.0)])]
    (row,) = stream_rows(records)
    assert (row["requests"], row["hit_rate"], row["reuse_ratio"], row["from_disk"]) == (4, 0.5, 0.25, 0.75)
    assert (row["hit_ttft_ms"].mean, row["hit_ttft_ms"].p99, row["miss_ttft_ms"].p50) == (200, pytest.approx(298), 1000)
    assert row["ttft_ms"].n == 4 and (row["ram_bytes"], row["evictions"]) == (3, 3)  # the state at the last request


def _in_process(record: dict, point: str) -> dict:
    return {"point": point, "warmup": False, "max_new_tokens": 4, "itl_ms": [5.0, 7.0], "tpot_ms": 6.0,
            "e2e_ms": record["ttft_ms"] + 12, **record}


def test_a_reuse_report_shows_cold_and_warm_ttft_with_spread(tmp_path):
    records = [_in_process(_reuse_record("doc", mode, i, ttft, reuse_ratio=0.9 if mode == "prefix" and i else 0.0),
                           f"doc/{mode}/{'ram' if mode == 'prefix' else '-'}")
               for mode, ttfts in (("none", (1000, 800, 1200)), ("prefix", (1100, 100, 300))) for i, ttft in enumerate(ttfts)]
    out = _run_dir(tmp_path / "r", {"suite": "my-reuse", "kind": "reuse"}, records)
    report = write_report(out).read_text()
    # warm prefix TTFT 100 and 300: mean 200 ± 141.4; none on the same requests: 1000; speedup 5x
    assert "| doc | prefix | ram | 100 | 1100.0 | 200.0 ± 141.4 | 200.0 / 280.0 / 298.0 | 5.00x | 0.90 | 1.00 |" in report
    assert "| doc | none | - | 100 | 1000.0 | 1000.0 ± 282.8 |" in report
    assert (out / "figures" / "ttft.png").exists()


def test_a_traffic_report_shows_hit_rates_and_ttft_per_stream(tmp_path):
    records = [_in_process({"stream": "zipf", "trial": 0, "request_index": i, "ttft_ms": ttft, "hit": hit,
                            "reuse_ratio": 0.5 if hit else 0.0, "tier_tokens": {"disk": 10} if hit else {},
                            "ram_bytes": 2048, "disk_bytes": 0, "evictions": i}, f"zipf/prefix/ram+disk")
               for i, (ttft, hit) in enumerate(((300.0, False), (100.0, True), (200.0, True), (400.0, False)))]
    out = _run_dir(tmp_path / "t", {"suite": "my-traffic", "kind": "traffic"}, records)
    report = write_report(out).read_text()
    assert "| zipf | 4 | 0.50 | 0.25 | 1.00 | 250.0 ± 129.1 | 250.0 / 370.0 / 397.0 | 150.0 / 350.0 | 2.00 KiB | 0 B | 3 |" \
        in report


def test_compare_aligns_an_in_process_suite_and_a_load_run_on_prompt_and_output_tokens(tmp_path, capsys):
    suite, load = _suite(tmp_path / "engine"), _load(tmp_path / "server")
    assert main(["compare", str(suite), str(load), "--out", str(tmp_path / "c.md")]) == 0
    text = (tmp_path / "c.md").read_text()
    assert capsys.readouterr().out.startswith(text)
    assert "Rows align on prompt, output;" in text
    header = next(line for line in text.splitlines() if line.startswith("| prompt | output |"))
    assert "| engine: row | engine: n | engine: TTFT ms p50 / p99 |" in header
    assert "| server: row | server: n | server: TTFT ms p50 / p99 |" in header
    row = next(line for line in text.splitlines() if "strategy dynamic" in line)
    # the suite's TTFT (10/20/30 ms) and the server's (100/200/300 ms) in one row
    assert row.startswith("| 128 | 32 | strategy dynamic, batch 1 | 3 | 20.0 / 29.8 |")
    assert "| rate 1 | 3/4 | 200.0 / 298.0 |" in row


def test_compare_refuses_a_missing_or_corrupt_directory_in_one_line(tmp_path, capsys):
    suite = _suite(tmp_path / "s")
    assert main(["compare", str(suite), str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (f"kvbench: error: {tmp_path / 'nowhere'} is not a directory; run a suite first "
                                       f"(kvbench run SUITE --out {tmp_path / 'nowhere'}) or kvbench load --out "
                                       f"{tmp_path / 'nowhere'}\n")
    corrupt = _run_dir(tmp_path / "c", None, [])
    (corrupt / "run.json").write_text("[1")
    assert main(["compare", str(suite), str(corrupt)]) == 2
    assert "run.json is corrupt (not a JSON object)" in capsys.readouterr().err
    with pytest.raises(KvbenchError, match="needs two run directories or more"):
        compare([suite])


def test_the_report_and_compare_import_and_run_without_torch_or_matplotlib(tmp_path):
    load = _load(tmp_path / "l")
    script = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "matplotlib"):
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, Refuse())
from pathlib import Path
from kvbench.report import write_report
from kvbench.report.compare import compare
write_report(Path({str(load)!r}))
compare([Path({str(load)!r}), Path({str(load)!r})])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "matplotlib")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
