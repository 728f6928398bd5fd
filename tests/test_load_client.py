"""The load client against the in-process fake server: faults, open-loop sends, CLI errors, partial runs."""

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time

import pytest
from jinja2 import TemplateError

from kvbench.bench.records import read_records
from kvbench.cli import build_parser, load_spec_from_flags, main
from kvbench.load.fake import FakeConfig, FakeServer
from kvbench.load.loadgen import event_loop, run_async, run_load
from kvbench.load.session import client_cpu
from kvbench.load.spec import LoadSpec
from kvbench.report import write_report
from kvbench.load.stream import Endpoint, Trace, http_clients
from kvbench.workloads import Request, WorkloadSpec
from kvbench.workloads.tokenizer import load_tokenizer

FAULTS = ("slow_first", "http_500", "malformed", "drop", "stall", "no_usage")


def conversations(tmp_path, prompts):
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p}]}) for p in prompts))
    return path


def requests(*prompts, max_tokens=5):
    return [Request(i, ({"role": "user", "content": p},), max_tokens) for i, p in enumerate(prompts)]


def run(url, reqs, schedule, kind="completions", timeout_s=30.0, max_concurrency=None, tokenizer=None):
    records = []
    asyncio.run(run_load(Endpoint(url, "fake-model", kind, timeout_s), reqs, schedule, records.append, max_concurrency,
                         tokenizer))
    return sorted(records, key=lambda r: r["index"])


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_every_fault_is_recorded_with_its_reason_and_the_run_goes_on(kind):
    config = FakeConfig(stall_s=2.0, slow_first_s=0.2)
    prompts = ["fine"] + [f"a [[fault:{f}]]" for f in FAULTS] + ["also fine"]
    with FakeServer(config) as url:
        records = run(url, requests(*prompts), [0.0] * len(prompts), kind, timeout_s=0.5)
    status = {p: r["status"] for p, r in zip(prompts, records)}
    assert status == {"fine": "ok", "a [[fault:slow_first]]": "ok", "a [[fault:http_500]]": "http_500",
                      "a [[fault:malformed]]": "malformed_sse", "a [[fault:drop]]": "connection_dropped",
                      "a [[fault:stall]]": "timeout", "a [[fault:no_usage]]": "ok", "also fine": "ok"}
    by = dict(zip(prompts, records))
    ok = by["fine"]
    assert ok["usage_source"] == ok["output_tokens_by"] == "server" and ok["output_tokens"] == 5
    assert ok["prompt_tokens"] == 1
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
    assert no_usage["output_tokens_by"] == "chunks"  # no tokenizer given


def utf8_pieces(text: str) -> list[bytes]:
    """A byte-level tokenization: each character's UTF-8 bytes in tokens of at most 2 bytes."""
    return [c.encode()[i:i + 2] for c in text for i in range(0, len(c.encode()), 2)]


class PieceTokenizer:
    """The tokenizer of `utf8_pieces`; keeps every text it was given."""

    def __init__(self):
        self.seen = []

    def encode(self, text, add_special_tokens=True):
        self.seen.append(text)
        return utf8_pieces(text)


class PairTokenizer:
    """Two words make one token: re-tokenizing a whole stream merges tokens across chunks, as BPE does."""

    def encode(self, text, add_special_tokens=True):
        return [0] * ((len(text.split()) + 1) // 2)


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_several_tokens_in_one_chunk_are_all_counted(kind):
    # 🙂 and 東 are 2 tokens each, held back by the server until the character is whole: 5 tokens in 3 chunks
    # per round, and every chunk's event is cut inside its character on the wire
    tokens = tuple(utf8_pieces("🙂東 "))
    tokenizer = PieceTokenizer()
    with FakeServer(FakeConfig(tokens=tokens)) as url:
        counted, = run(url, requests("a [[fault:no_usage]]", max_tokens=10), [0.0], kind, tokenizer=tokenizer)
        by_chunk, = run(url, requests("a [[fault:no_usage]]", max_tokens=10), [0.0], kind)
    assert counted["status"] == by_chunk["status"] == "ok"
    assert "".join(tokenizer.seen[-6:]) == "🙂東 🙂東 "  # whole characters, however the bytes were cut
    assert (counted["output_tokens"], counted["output_tokens_by"]) == (10, "tokenizer")
    assert counted["tpot_ms"] == pytest.approx((counted["e2e_ms"] - counted["ttft_ms"]) / 9)
    assert (by_chunk["output_tokens"], by_chunk["output_tokens_by"]) == (6, "chunks")  # one per chunk: too few
    assert len(counted["itl_ms"]) == 5  # ITL stays one gap per chunk


def test_tokens_that_merge_when_re_tokenized_are_counted_per_chunk():
    with FakeServer() as url:
        record, = run(url, requests("a [[fault:no_usage]]", max_tokens=6), [0.0], tokenizer=PairTokenizer())
    # the whole text " tok tok tok tok tok tok" re-tokenizes to 3
    assert (record["output_tokens"], record["output_tokens_by"]) == (6, "tokenizer")


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_error_events_in_the_stream_fail_the_request_with_the_server_message(kind):
    with FakeServer() as url:
        after_text, before_text = run(url, requests("a [[fault:error]]", "b [[fault:error_first]]"), [0.0] * 2, kind)
    assert after_text["status"] == before_text["status"] == "server_error"
    assert after_text["error"] == "injected mid-stream error" and after_text["ttft_ms"] is not None
    assert before_text["error"] == "injected error before any token" and before_text["ttft_ms"] is None


def test_json_of_an_unexpected_shape_is_malformed_and_the_run_goes_on():
    prompts = [f"a [[fault:{f}]]" for f in ("bad_choices", "bad_choice", "bad_delta", "bad_usage")] + ["fine"]
    with FakeServer() as url:
        records = run(url, requests(*prompts), [0.0] * len(prompts))
    assert [r["status"] for r in records] == ["malformed_sse"] * 4 + ["ok"]
    assert "not a list of objects" in records[0]["error"] and "usage is not an object" in records[3]["error"]


def test_an_unexpected_client_exception_fails_only_its_request():
    unsendable = Request(0, ({"role": "user", "content": object()},), 5)
    with FakeServer() as url:
        failed, fine = run(url, [unsendable, requests("x", "fine")[1]], [0.0] * 2, "chat")
    assert failed["status"] == "client_error: TypeError" and "not JSON serializable" in failed["error"]
    assert fine["status"] == "ok"


def test_client_prompt_counts_of_chat_requests_go_through_the_chat_template():
    tok = load_tokenizer("smollm2-135m")
    reqs = requests("hello there [[fault:no_usage]]")
    with FakeServer() as url:
        chat, completions = [run(url, reqs, [0.0], kind, tokenizer=tok)[0] for kind in ("chat", "completions")]
    templated = tok.apply_chat_template(list(reqs[0].messages), add_generation_prompt=True, tokenize=True)["input_ids"]
    assert chat["usage_source"] == completions["usage_source"] == "client"
    assert chat["prompt_tokens"] == len(templated)
    assert completions["prompt_tokens"] == len(tok.encode(reqs[0].prompt, add_special_tokens=False)) < len(templated)


class WordTokenizer:
    """One token per word; its chat template gives a plain list (older transformers) and rejects a
    conversation that does not start with a user turn, as many templates do."""

    chat_template = "{{ messages }}"

    def encode(self, text, add_special_tokens=True):
        return text.split()

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        if messages[0]["role"] != "user":
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
        return ["<user>", *self.encode(messages[0]["content"]), "<assistant>"]


def test_chat_template_counts_from_a_list_and_the_text_when_the_template_rejects_the_conversation():
    def count(*messages):
        return Trace(Request(0, messages, 5), 0.0, 0.0).record(WordTokenizer(), chat=True)["prompt_tokens"]

    assert count({"role": "user", "content": "one two"}) == 4
    assert count({"role": "assistant", "content": "one"}, {"role": "user", "content": "two"}) == 2


def test_requests_cancelled_waiting_for_a_slot_are_not_counted_as_sent(tmp_path):
    records = []

    async def interrupted(url):
        load = run_load(Endpoint(url, "fake-model"), requests("a", "b", "c"), [0.0] * 3, records.append, 1)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(load, 0.3)

    with FakeServer(FakeConfig(token_delay_s=0.2)) as url:
        asyncio.run(interrupted(url))
    assert [r["status"] for r in records] == ["interrupted"] * 3
    assert sorted(r["sent_s"] is not None for r in records) == [False, False, True]
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps({"request_rate": "inf", **r}) + "\n" for r in records))
    (out / "run.json").write_text(json.dumps({"kind": "load", "partial": True, "points": {"inf": {"planned": 3}}}))
    assert "| inf | 0 / 1 / 3 |" in write_report(out).read_text()


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
                     "--same-prompts-each-rate", "--slo", "ttft_ms=10000,tpot_ms=10000", "--out", str(out), "--no-progress"])
    assert code == 0
    records = read_records(out / "results.jsonl")
    assert len(records) == 6 and {r["request_rate"] for r in records} == {"inf", "50"}
    summary = json.loads((out / "summary.json").read_text())
    inf = summary["points"]["inf"]
    assert (inf["completed"], inf["failed"], inf["failures"]) == (2, 1, {"http_500": 1})
    assert inf["good_requests"] == 2 and inf["prompt_tokens"] == 5 and inf["output_tokens"] == 6
    assert "ttft_ms.p99" in inf and "itl_ms.p50" in inf and "send_lag_ms.p99" in inf
    info = json.loads((out / "run.json").read_text())
    assert info["complete"] is True and info["server"]["model"] == "fake-model"
    assert info["client"]["event_loop"] == "uvloop"  # the load extra installs it
    metrics = info["points"]["inf"]["server_metrics"]
    assert metrics["available"] and metrics["counters"]["vllm:prefix_cache_queries_total"] == 5
    report = (out / "report.md").read_text()
    assert "| inf | 2 / 3 / 3 |" in report and "http_500" in report and "PARTIAL" not in report
    stdout = capsys.readouterr().out
    assert "load: 2 measurements (points x trials);" in stdout
    assert "\nfailed: rate inf 1 of 3 (http_500 1); rate 50 1 of 3 (http_500 1)\n" in stdout
    for point in (info["points"]["inf"], inf):  # run.json and summary.json
        assert 0 < point["client_cpu_s"] and 0 < point["client_cpu_share"]
    assert "- client CPU time (a client on the server's cores takes it from the server): rate inf " in report
    assert main(["report", str(out)]) == 0  # the report command reads a load run too


def test_run_async_runs_on_uvloop_where_installed_and_on_asyncio_without(monkeypatch):
    async def loop_module():
        return type(asyncio.get_running_loop()).__module__

    assert run_async(loop_module()).startswith("uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert event_loop() == "asyncio" and run_async(loop_module()).startswith("asyncio")


def test_client_cpu_counts_this_process_cpu_time_not_waiting():
    busy, idle = {}, {}
    with client_cpu(busy):
        start = time.process_time()
        while time.process_time() - start < 0.2:
            pass
    with client_cpu(idle):
        time.sleep(0.2)
    assert busy["client_cpu_s"] >= 0.2 and busy["client_cpu_share"] > 0.3
    assert idle["client_cpu_s"] < 0.05 and idle["client_cpu_share"] < 0.25


@pytest.mark.parametrize("limit, over", [(None, None), ("1", None), ("0.5", ["rate 1000: 2 of 2 failed"]),
                                         ("0.4", ["rate inf: 1 of 2 failed", "rate 1000: 2 of 2 failed"])])
def test_max_error_rate_fails_the_command_but_keeps_records_and_report(limit, over, tmp_path, capsys):
    # rate inf sends a and b (1 of 2 fail), rate 1000 c and d (2 of 2)
    path = conversations(tmp_path, ["a", "b [[fault:http_500]]", "c [[fault:stall]]", "d [[fault:http_500]]", "e"])
    out = tmp_path / "out"
    with FakeServer(FakeConfig(stall_s=2.0)) as url:
        argv = ["load", "--url", url, "--workload", str(path), "--request-rates", "inf,1000", "--num-requests", "2",
                "--timeout", "0.5", "--out", str(out), "--no-progress"]
        code = main([*argv, *(["--max-error-rate", limit] if limit else [])])
    captured = capsys.readouterr()
    assert "\nfailed: rate inf 1 of 2 (http_500 1); rate 1000 2 of 2 (http_500 1, timeout 1)\n" in captured.out
    assert len(read_records(out / "results.jsonl")) == 4 and (out / "report.md").exists()
    if over is None:
        assert code == 0 and captured.err == ""
    else:
        assert code == 1
        assert captured.err == (f"kvbench: error: {'; '.join(over)}: above --max-error-rate {limit}; "
                                f"the records and report are in {out}\n")


def test_a_second_ctrl_c_during_the_partial_report_still_exits_130(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"

    def measured_one_then_ctrl_c(spec, options):
        options.out.mkdir()
        (options.out / "results.jsonl").write_text(json.dumps({"request_rate": "inf", "status": "ok"}) + "\n")
        raise KeyboardInterrupt

    def second_ctrl_c(out):
        raise KeyboardInterrupt

    monkeypatch.setattr("kvbench.bench.runner.run", measured_one_then_ctrl_c)
    monkeypatch.setattr("kvbench.report.write_report", second_ctrl_c)
    path = conversations(tmp_path, ["hi"])
    assert main(["load", "--url", "http://127.0.0.1:9/v1", "--workload", str(path), "--out", str(out)]) == 130
    assert capsys.readouterr().err == "kvbench: interrupted; every record already measured is kept (rerun with --resume)\n"


@pytest.mark.parametrize("workload", ["random", "prefix-repetition", "reuse:rag-prefix-100", "jsonl"])
def test_each_rate_sends_its_own_prompts_unless_asked_for_the_same(workload, tmp_path):
    if workload == "jsonl":
        workload = str(conversations(tmp_path, [f"conversation {i}" for i in range(6)]))
    seen = {}
    for same in (False, True):
        out = tmp_path / f"out-{same}"
        argv = ["load", "--workload", workload, "--tokenizer", "smollm2-135m", "--request-rates", "inf,1000",
                "--num-requests", "3", "--prompt-tokens", "16", "--prefix-tokens", "32", "--prefixes", "1",
                "--suffixes", "3", "--output-tokens", "2", "--out", str(out), "--no-progress"]
        server = FakeServer()
        with server as url:
            assert main([*argv, "--url", url, *(["--same-prompts-each-rate"] if same else [])]) == 0
        # after the probe request; rate inf sends all at once, so its arrival order varies
        first, second = set(server.prompts[-6:-3]), set(server.prompts[-3:])
        assert len(first) == 3 == len(second)
        seen[same] = first, second
        info, summary = (json.loads((out / name).read_text()) for name in ("run.json", "summary.json"))
        assert info["spec"]["same_prompts_each_rate"] is summary["same_prompts_each_rate"] is same
    assert seen[False][0].isdisjoint(seen[False][1])
    assert seen[True][0] == seen[True][1]


@pytest.mark.parametrize("workload, shared", [("reuse:rag-interior-100", False), ("reuse:rag-prefix-100", True)])
def test_the_load_report_finds_a_prefix_effect_only_where_requests_share_a_prefix(workload, shared, tmp_path):
    out = tmp_path / "out"
    with FakeServer() as url:
        assert main(["load", "--url", url, "--workload", workload, "--tokenizer", "smollm2-135m", "--num-requests", "3",
                     "--output-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    point = json.loads((out / "summary.json").read_text())["points"]["inf"]
    assert ("ttft_new_over_shared" in point) is shared
    assert ("## Prefix cache effect" in (out / "report.md").read_text()) is shared


def test_a_conversation_file_too_short_for_every_rate_to_send_its_own_is_refused(tmp_path, capsys):
    path = conversations(tmp_path, ["a", "b", "c"])
    assert main(["load", "--url", "http://127.0.0.1:9/v1", "--workload", str(path), "--request-rates", "1,2",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "holds 3 conversations and 2 rates need 6 for each to send its own; give --num-requests 1 or " \
           "--same-prompts-each-rate" in capsys.readouterr().err


def test_load_flag_defaults_equal_config_defaults():
    args = build_parser().parse_args(["load", "--url", "http://127.0.0.1:1/v1"])
    config, default = load_spec_from_flags(args), LoadSpec(url="http://127.0.0.1:1/v1")
    assert config == default
    assert config.workload == WorkloadSpec()


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


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "2", "--duration", "0"], "duration must be a finite number > 0 seconds, got 0.0"),
    (["--request-rate", "2", "--duration", "-1"], "duration must be a finite number > 0 seconds, got -1.0"),
    (["--request-rate", "2", "--duration", "nan"], "duration must be a finite number > 0 seconds, got nan"),
    (["--duration", "5"], "--duration needs a finite --request-rate"),
    (["--workload", "{tmp}/missing.jsonl"], "cannot read workload file"),
    (["--max-error-rate", "5"], "--max-error-rate must be a fraction from 0 to 1 (0.05 for 5%), got 5.0"),
])
def test_config_errors_are_reported_before_the_server_is_probed(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    workload = [] if "--workload" in argv else ["--workload", str(conversations(tmp_path, ["hi"]))]
    # nothing listens at the URL: probing it first would end in "cannot reach"
    assert main(["load", "--url", "http://127.0.0.1:9/v1", *argv, *workload, "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot reach" not in err


def test_summary_json_is_strict_json_with_null_for_statistics_without_samples(tmp_path):
    path = conversations(tmp_path, ["x [[fault:http_500]]"])
    out = tmp_path / "out"
    with FakeServer() as url:
        assert main(["load", "--url", url, "--workload", str(path), "--out", str(out), "--no-progress"]) == 0

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    point = json.loads((out / "summary.json").read_text(), parse_constant=reject)["points"]["inf"]
    assert point["failed"] == 1 and point["ttft_ms.p50"] is None and point["request_throughput"] == 0.0


def test_ctrl_c_before_any_request_was_sent_reports_nothing(tmp_path, capsys, monkeypatch):
    async def ctrl_c_during_the_probe(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("kvbench.load.session.check_server", ctrl_c_during_the_probe)
    path = conversations(tmp_path, ["hi"])
    with FakeServer() as url:
        code = main(["load", "--url", url, "--workload", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 130
    assert capsys.readouterr().err == "kvbench: interrupted before anything was measured; nothing to report\n"


def test_a_server_that_does_not_stream_is_refused(tmp_path, capsys):
    path = conversations(tmp_path, ["hi"])
    with FakeServer(FakeConfig(streaming=False)) as url:
        assert main(["load", "--url", url, "--workload", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "answered a streaming request without streaming" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_keeps_the_measured_requests_and_marks_the_report_partial(tmp_path, workers):
    path = conversations(tmp_path, ["quick"] * 3 + ["slow [[fault:stall]]"] * 3)
    out = tmp_path / "out"
    with FakeServer(FakeConfig(stall_s=30.0)) as url:
        proc = subprocess.Popen([sys.executable, "-m", "kvbench.cli", "load", "--url", url, "--workload", str(path),
                                 "--out", str(out), "--no-progress", "--workers", str(workers)],
                                stderr=subprocess.PIPE, text=True,
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
    assert json.loads((out / "run.json").read_text())["complete"] is False
    assert "PARTIAL" in (out / "report.md").read_text()


def test_a_load_spec_file_runs_through_kvbench_run_and_resume_measures_only_a_cut_rate(tmp_path, capsys):
    """`kind: load` in a YAML file goes through the one runner like any suite; a rate cut mid-way (Ctrl-C) is
    dropped on --resume and sent again from its first request, the complete rate is not sent again."""
    import yaml

    path = conversations(tmp_path, [f"conversation {i}" for i in range(8)])
    out, spec = tmp_path / "out", tmp_path / "http.yaml"
    server = FakeServer()
    with server as url:
        spec.write_text(yaml.safe_dump({"name": "http", "kind": "load", "url": url, "workload": {"kind": str(path)},
                                        "request_rates": ["inf", 100], "num_requests": 4}))
        assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 0
        records = read_records(out / "results.jsonl")
        assert sorted((r["point"], r["trial"], r["index"]) for r in records) == \
            [(p, 0, i) for p in ("100", "inf") for i in range(4)]
        lines = (out / "results.jsonl").read_text().splitlines()
        cut = [line for line in lines if not (json.loads(line)["point"] == "100" and json.loads(line)["index"] >= 2)]
        (out / "results.jsonl").write_text("\n".join(cut) + "\n")
        sent_before = len(server.prompts)
        assert main(["run", str(spec), "--out", str(out), "--no-progress", "--resume"]) == 0
        resent = server.prompts[sent_before + 1:]  # after the probe request
    assert "dropped 2 record(s) of 1 measurement(s) cut mid-way" in capsys.readouterr().out
    assert sorted(resent) == [f"conversation {i}" for i in range(4, 8)]  # rate 100's own conversations, all four
    records = read_records(out / "results.jsonl")
    assert sorted((r["point"], r["index"]) for r in records) == [(p, i) for p in ("100", "inf") for i in range(4)]
    info = json.loads((out / "run.json").read_text())
    assert info["kind"] == "load" and info["complete"] and len(info["parts"]) == 2


def test_worker_processes_send_every_request_once_from_one_schedule(tmp_path, monkeypatch):
    """--workers 3: the requests are dealt to three processes that share one start time; every request is sent
    once, each record carries its own scheduled time of the run's one schedule, and this process writes them."""
    from kvbench.load.spec import LoadSpec
    from kvbench.load.workers import concurrency_shares

    from kvbench.load import workers

    spawned, process = [], workers.multiprocessing.get_context("spawn").Process
    start = process.start

    def counted_start(self):
        spawned.append(self)
        start(self)

    monkeypatch.setattr(process, "start", counted_start)
    path, out = conversations(tmp_path, [f"conversation {i}" for i in range(12)]), tmp_path / "out"
    server = FakeServer()
    with server as url:
        assert main(["load", "--url", url, "--workload", str(path), "--request-rate", "200", "--workers", "3",
                     "--out", str(out), "--no-progress"]) == 0
    records = read_records(out / "results.jsonl")
    assert sorted(r["index"] for r in records) == list(range(12)) and all(r["status"] == "ok" for r in records)
    assert len(spawned) == 3 and all(p.exitcode == 0 for p in spawned)  # the workers sent them, not this process
    assert sorted(server.prompts[1:]) == sorted(f"conversation {i}" for i in range(12))  # after the probe
    schedule = LoadSpec(url=url, request_rates=(200.0,), num_requests=12).schedule(200.0)
    assert sorted(r["scheduled_s"] for r in records) == schedule
    assert json.loads((out / "run.json").read_text())["points"]["200"]["client_cpu_s"] > 0
    assert concurrency_shares(7, 3) == [3, 2, 2] and concurrency_shares(None, 2) == [None, None]
    assert main(["load", "--url", url, "--workers", "4", "--max-concurrency", "2", "--workload", str(path),
                 "--out", str(tmp_path / "o2")]) == 2
