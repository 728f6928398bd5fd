"""The load client against the in-process fake server: faults, open-loop sends, CLI errors, partial runs."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from kvbench.bench.records import read_records
from kvbench.cli import build_parser, load_config, main
from kvbench.clients.fake import FakeConfig, FakeServer
from kvbench.clients.loadgen import run_load
from kvbench.clients.run import LoadConfig
from kvbench.clients.stream import Endpoint, http_clients
from kvbench.clients.workloads import LoadWorkload, Request

FAULTS = ("slow_first", "http_500", "malformed", "drop", "stall", "no_usage")


def conversations(tmp_path, prompts):
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p}]}) for p in prompts))
    return path


def requests(*prompts, max_tokens=5):
    return [Request(i, ({"role": "user", "content": p},), max_tokens) for i, p in enumerate(prompts)]


def run(url, reqs, schedule, kind="completions", timeout_s=30.0, max_concurrency=None):
    records = []
    asyncio.run(run_load(Endpoint(url, "fake-model", kind, timeout_s), reqs, schedule, records.append, max_concurrency))
    return sorted(records, key=lambda r: r["index"])


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_every_fault_is_recorded_with_its_reason_and_the_run_goes_on(kind):
    config = FakeConfig(stall_s=2.0, slow_first_s=0.2)
    prompts = ["fine"] + [f"a [[fault:{f}]]" for f in FAULTS] + ["fine again"]
    with FakeServer(config) as url:
        records = run(url, requests(*prompts), [0.0] * len(prompts), kind, timeout_s=0.5)
    status = {p: r["status"] for p, r in zip(prompts, records)}
    assert status == {"fine": "ok", "a [[fault:slow_first]]": "ok", "a [[fault:http_500]]": "http_500",
                      "a [[fault:malformed]]": "malformed_sse", "a [[fault:drop]]": "connection_dropped",
                      "a [[fault:stall]]": "timeout", "a [[fault:no_usage]]": "ok", "fine again": "ok"}
    by = dict(zip(prompts, records))
    ok = by["fine"]
    assert ok["usage_source"] == "server" and ok["output_tokens"] == 5 and ok["prompt_tokens"] == 1
    assert ok["cached_tokens"] == 0 and len(ok["itl_ms"]) == 4
    assert 0 < ok["ttft_ms"] <= ok["e2e_ms"]
    assert ok["tpot_ms"] == pytest.approx((ok["e2e_ms"] - ok["ttft_ms"]) / 4)
    # the role-only chunk of chat comes at once; TTFT waits for the first text
    assert by["a [[fault:slow_first]]"]["ttft_ms"] >= 200.0
    # what was measured before a failure is kept
    assert by["a [[fault:malformed]]"]["ttft_ms"] is not None and by["a [[fault:stall]]"]["ttft_ms"] is not None
    assert "injected failure" in by["a [[fault:http_500]]"]["error"]
    no_usage = by["a [[fault:no_usage]]"]
    assert no_usage["usage_source"] == "client" and no_usage["output_tokens"] == 5 and no_usage["prompt_tokens"] is None


def test_sends_follow_the_schedule_not_the_completions():
    slow = FakeConfig(token_delay_s=0.1)
    with FakeServer(slow) as url:
        open_loop = run(url, requests(*["x"] * 4), [0.0] * 4)
        capped = run(url, requests(*["x"] * 3), [0.0] * 3, max_concurrency=1)
    # open loop: every request is sent before the first one ends
    assert max(r["sent_s"] for r in open_loop) < min(r["end_s"] for r in open_loop)
    # a concurrency cap of 1: each request waits for the previous one, and the wait is send lag
    for earlier, later in zip(capped, capped[1:]):
        assert later["sent_s"] >= earlier["end_s"]
    assert capped[2]["send_lag_ms"] >= 2 * 4 * 100.0


def test_connection_pools_never_cap_concurrency():
    clients = http_clients(1000, 5.0)
    assert len(clients) == 32  # small pools: httpcore scans a whole pool on every request event
    assert all(c._transport._pool._max_connections == 1000 for c in clients)
    assert len(http_clients(8, 5.0)) == 1


def test_load_command_writes_records_summary_and_report(tmp_path, capsys):
    path = conversations(tmp_path, ["one two three", "four five", "six [[fault:http_500]]"])
    out = tmp_path / "out"
    with FakeServer() as url:
        code = main(["load", "--url", url, "--workload", str(path), "--request-rates", "inf,50", "--output-tokens", "3",
                     "--slo", "ttft_ms=10000,tpot_ms=10000", "--out", str(out), "--no-progress"])
    assert code == 0
    records = read_records(out / "results.jsonl")
    assert len(records) == 6 and {r["request_rate"] for r in records} == {"inf", "50"}
    summary = json.loads((out / "summary.json").read_text())
    inf = summary["points"]["inf"]
    assert (inf["completed"], inf["failed"], inf["failures"]) == (2, 1, {"http_500": 1})
    assert inf["good_requests"] == 2 and inf["prompt_tokens"] == 5 and inf["output_tokens"] == 6
    assert "ttft_ms.p99" in inf and "itl_ms.p50" in inf and "send_lag_ms.p99" in inf
    info = json.loads((out / "run.json").read_text())
    assert info["partial"] is False and info["server"]["model"] == "fake-model"
    metrics = info["points"]["inf"]["server_metrics"]
    assert metrics["available"] and metrics["counters"]["vllm:prefix_cache_queries_total"] == 5
    report = (out / "report.md").read_text()
    assert "| inf | 2 / 3 / 3 |" in report and "http_500" in report and "PARTIAL" not in report
    assert "requests measured" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0  # the report command reads a load run too


def test_load_flag_defaults_equal_config_defaults():
    args = build_parser().parse_args(["load", "--url", "http://127.0.0.1:1/v1"])
    config, default = load_config(args), LoadConfig(url="http://127.0.0.1:1/v1")
    assert config == default
    assert config.workload == LoadWorkload()


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://127.0.0.1:9/v1"], "cannot reach http://127.0.0.1:9/v1"),
    (["--url", "{url}", "--model", "gpt-9"], "does not serve model 'gpt-9'; it serves: fake-model"),
    (["--url", "{url}", "--slo", "ttft=3"], "cannot read SLO 'ttft=3'"),
    (["--url", "{url}", "--request-rate", "0"], "request rate must be > 0"),
    (["--url", "{url}", "--request-rates", "1,-2"], "request rate must be > 0"),
    (["--url", "{url}", "--workload", "random"], "give --tokenizer"),
    (["--url", "ftp://x"], "must start with http://"),
])
def test_bad_input_gives_one_line_errors(argv, message, tmp_path, capsys):
    path = conversations(tmp_path, ["hi"])
    with FakeServer() as url:
        argv = [a.replace("{url}", url) for a in argv]
        workload = [] if "--workload" in argv else ["--workload", str(path)]
        assert main(["load", *argv, *workload, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kvbench: error:") and "Traceback" not in err


def test_a_server_that_does_not_stream_is_refused(tmp_path, capsys):
    path = conversations(tmp_path, ["hi"])
    with FakeServer(FakeConfig(streaming=False)) as url:
        assert main(["load", "--url", url, "--workload", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "answered a streaming request without streaming" in capsys.readouterr().err


def test_ctrl_c_keeps_the_measured_requests_and_marks_the_report_partial(tmp_path):
    path = conversations(tmp_path, ["quick"] * 3 + ["slow [[fault:stall]]"] * 3)
    out = tmp_path / "out"
    with FakeServer(FakeConfig(stall_s=30.0)) as url:
        proc = subprocess.Popen([sys.executable, "-m", "kvbench.cli", "load", "--url", url, "--workload", str(path),
                                 "--out", str(out), "--no-progress"], stderr=subprocess.PIPE, text=True,
                                # a shell's background job inherits SIGINT ignored; Ctrl-C needs the default
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(read_records(out / "results.jsonl", strict=False)) < 3:
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 130, err
    assert "partial report" in err
    records = read_records(out / "results.jsonl")
    assert sorted(r["status"] for r in records) == ["interrupted"] * 3 + ["ok"] * 3
    assert all(r["ttft_ms"] is not None for r in records)  # the stalled requests had their first token
    assert json.loads((out / "run.json").read_text())["partial"] is True
    assert "PARTIAL" in (out / "report.md").read_text()
