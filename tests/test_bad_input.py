"""Bad input gets one line on stderr (`kvbench: error: ...`) and a non-zero exit, never a traceback
or a silently wrong result."""

import json

import pytest
import yaml

from kvbench.cli import main
from kvbench.strategies import build_strategy


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbench: error: ") and err.count("\n") == 1, err
    return err


def write_suite(tmp_path, data: dict) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("data, message", [
    ({"trials": "3"}, "suite key trials must be a whole number, got '3'"),
    ({"warmup": "1"}, "suite key warmup must be a whole number, got '1'"),
    ({"trials": 2.0}, "suite key trials must be a whole number, got 2.0"),
    ({"workload": "synthetic"}, "suite key workload must be a mapping, got 'synthetic'"),
    ({"workload": {"kind": "needle", "depths": 0.5}}, "workload key depths must be a list, got 0.5; write depths: [0.5]"),
    ({"workload": {"kind": "text", "prompts": "Hello"}}, "workload key prompts must be a list, got 'Hello'"),
    ({"batch_sizes": 2}, "suite key batch_sizes must be a list, got 2"),
    ({"prompt_tokens": ["8"]}, "suite key prompt_tokens holds '8'; each item must be a whole number or null"),
    ({"kind": "reuse", "break_even": 512}, "reuse key break_even must be a list, got 512"),
    ({"kind": "reuse", "workloads": "code"}, "reuse key workloads must be a list, got 'code'"),
    ({"kind": "reuse", "tiers": "disk"}, "reuse key tiers must be a list, got 'disk'"),
    ({"kind": "traffic", "documents": "12"}, "traffic key documents must be a whole number, got '12'"),
])
def test_suite_values_of_the_wrong_type_are_refused(data, message, tmp_path, capsys):
    assert message in one_line_error(["run", write_suite(tmp_path, {"name": "x", **data}), "--dry-run"], capsys)


@pytest.mark.parametrize("strategy, message", [
    ("quantized:bits=4.0", "strategy 'quantized' parameter bits must be a whole number, got 4.0"),
    ("quantized:group_size=64.0", "strategy 'quantized' parameter group_size must be a whole number, got 64.0"),
    ("h2o:window=8.0", "strategy 'h2o' parameter window must be a whole number, got 8.0"),
    ("snapkv:window=8.0", "strategy 'snapkv' parameter window must be a whole number, got 8.0"),
    ("sink:budget=true", "strategy 'sink' parameter budget must be a number, got True"),
])
def test_strategy_parameters_of_the_wrong_type_are_refused(strategy, message, capsys):
    assert message in one_line_error(["run", "prompt-sweep", "--strategies", strategy, "--dry-run"], capsys)
    assert message in one_line_error(["generate", "hi", "--strategy", strategy], capsys)


def test_typed_fields_keep_what_their_annotations_allow():
    assert build_strategy("h2o", budget=64).budget == 64  # float | int: a token count
    assert build_strategy("h2o", budget=0.25).budget == 0.25  # ... or a fraction
    assert build_strategy("quantized", bits=4).bits == 4
    assert build_strategy("hf_quantized", backend="fp8", bits=None).bits is None


def test_a_float_field_takes_a_whole_number():
    from kvbench.bench.spec import spec_from_dict

    assert spec_from_dict({"name": "x", "kind": "traffic", "zipf_s": 2, "ram_documents": 3}).zipf_s == 2


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1", "1e-30"])
def test_temperatures_that_cannot_sample_are_refused(temperature, capsys):
    err = one_line_error(["generate", "hi", "--model", "synthetic:tiny", "--temperature", temperature], capsys)
    assert "temperature must be 0 (greedy) or a finite number >= 0.001" in err


def test_usable_temperatures_are_kept():
    from kvbench.engine import SamplingConfig

    assert SamplingConfig(temperature=0).greedy
    assert SamplingConfig(temperature=0.001).temperature == 0.001


@pytest.mark.parametrize("text", ["{\"suite\": \"x\",", "[1, 2]"])
def test_report_refuses_a_corrupt_run_json(text, tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text("{}\n")
    (tmp_path / "run.json").write_text(text)
    assert "run.json is corrupt (not a JSON object)" in one_line_error(["report", str(tmp_path)], capsys)


def test_a_run_without_run_json_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text(json.dumps({"suite": "my-reuse", "reuse_mode": "none"}) + "\n")
    message = one_line_error(["report", str(tmp_path)], capsys)
    assert message == (f"kvbench: error: {tmp_path} has no run.json, which says what kind of run wrote it and on "
                       "what; give the --out of a kvbench run or kvbench load, or restore its run.json\n")


@pytest.mark.parametrize("suite, found", [("tiny", "load"), ("reuse", "load"), ("tiny", "reuse"), ("reuse", "traffic")])
def test_resume_refuses_a_directory_of_another_kind_of_run(suite, found, tiny_suite, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"kind": found}))
    (out / "results.jsonl").write_text(json.dumps({"request_rate": "inf"}) + "\n")
    argv = ["run", str(tiny_suite) if suite == "tiny" else suite, "--resume", "--out", str(out), "--no-progress"]
    kind = "suite" if suite == "tiny" else "reuse"
    assert f"holds a {found} run, not a {kind} run" in one_line_error(argv, capsys)
    assert (out / "results.jsonl").read_text() == json.dumps({"request_rate": "inf"}) + "\n"


@pytest.mark.parametrize("url, reason", [
    ("http://exa mple/v1", "it contains whitespace"),
    ("http://example/v 1", "it contains whitespace"),
    ("ftp://example/v1", "it must start with http:// or https://"),
    ("http:///v1", "it names no host"),
    ("http://example:99999/v1", "its port is out of range"),
    ("http://[::1/v1", "Invalid port"),
])
def test_load_refuses_an_invalid_url_before_any_request(url, reason, tmp_path, capsys):
    out = tmp_path / "o"
    err = one_line_error(["load", "--url", url, "--out", str(out), "--no-progress"], capsys)
    assert f"--url {url!r} is not a server address: {reason}" in err
    assert not out.exists()  # refused while reading the flags, before the run (and any connection) starts


@pytest.mark.parametrize("strategy", ["quantized", "hf_quantized"])
def test_quantized_caches_refuse_batches(strategy, tiny):
    """Left padding would be kept as sinks and enter the quantization groups' min/max, so a batch
    would not equal its rows run one by one: refused rather than silently different."""
    from kvbench.engine import GenerationConfig, generate
    from kvbench.errors import KvbenchError

    config = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    with pytest.raises(KvbenchError, match=f"strategy '{strategy}' does not support batches yet; use batch size 1"):
        generate(tiny, build_strategy(strategy), [list(range(20, 60)), list(range(30, 40))], config)


@pytest.mark.parametrize("data, message", [
    ({"strategies": ["dynamic", "h2o"], "batch_sizes": [1, 2]}, "strategy 'h2o' does not support batches yet"),
    ({"strategies": ["dynamic", "quantized"], "batch_sizes": [1, 2]}, "strategy 'quantized' does not support batches"),
    ({"prompt_tokens": [16, 4090]}, "prompt of 4090 tokens + 8 new tokens exceeds the context window"),
    ({"strategies": ["dynamic", {"name": "snapkv", "budget": 0.5, "window": 8}], "prompt_tokens": [100, 10]},
     "snapkv: budget 0.5 keeps 5 of a 10-token prompt"),
])
def test_a_suite_whose_later_point_is_refused_is_refused_before_anything_is_measured(data, message, tmp_path, capsys):
    suite = {"name": "x", "model": "synthetic:tiny", "device": "cpu", "workload": {"kind": "synthetic"},
             "prompt_tokens": [16], "output_tokens": [8], "trials": 1, "warmup": 0, **data}
    out = tmp_path / "out"
    assert message in one_line_error(["run", write_suite(tmp_path, suite), "--out", str(out), "--no-progress"], capsys)
    assert not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text()


@pytest.mark.parametrize("data", [
    {"kind": "reuse", "workloads": ["system-prompt", "rag-prefix-8200"], "modes": ["none", "prefix"], "requests": 2},
    {"kind": "traffic", "streams": ["uniform"], "documents": 2, "document_tokens": 8200, "requests": 2},
])
def test_a_reuse_suite_with_documents_over_the_context_window_measures_nothing(data, tmp_path, capsys):
    suite = {"name": "x", "device": "cpu", "output_tokens": 4, **data}
    out = tmp_path / "out"
    err = one_line_error(["run", write_suite(tmp_path, suite), "--out", str(out), "--no-progress"], capsys)
    assert "new tokens exceeds the context window of smollm2-135m (8192 tokens)" in err
    assert not (out / "results.jsonl").exists()


@pytest.mark.parametrize("suite", ["tiny", "reuse"])
def test_a_second_run_on_one_out_is_refused_while_the_first_holds_it(suite, tiny_suite, tmp_path, capsys):
    import os

    from kvbench.bench.outlock import locked

    out = tmp_path / "out"
    out.mkdir()
    argv = ["run", str(tiny_suite) if suite == "tiny" else "reuse", "--quick", "--resume", "--out", str(out),
            "--no-progress"]
    with locked(out):  # what a first run holds while it measures
        err = one_line_error(argv, capsys)
    assert f"another kvbench run (pid {os.getpid()}) is writing to {out}; wait for it to end" in err
    assert not (out / "results.jsonl").exists()
    if suite == "tiny":
        assert main(argv) == 0  # released when the first run ends


@pytest.mark.parametrize("limit, message", [
    ("0", "memory size '0' is under one byte"),
    ("0.5", "memory size '0.5' is under one byte"),
    ("", "cannot read memory size ''"),
    ("1.2.3GB", "cannot read memory size '1.2.3GB'"),
    ("1e9", "cannot read memory size '1e9'"),
])
def test_memory_limits_that_are_no_size_are_refused(limit, message, capsys):
    assert message in one_line_error(["run", "prompt-sweep", "--memory-limit", limit, "--dry-run"], capsys)


@pytest.mark.parametrize("data, message", [
    ({"quick": 5}, "suite key quick must be a mapping, got 5"),
    ({"kind": "reuse", "quick": 5}, "reuse key quick must be a mapping, got 5"),
    ({"kind": "bogus"}, "unknown kind 'bogus'; valid: suite, reuse, traffic, load, serve (no kind: suite)"),
    ({"strategies": ["h2o:budget=0.5:budget=0.9"]}, "strategy 'h2o:budget=0.5:budget=0.9' sets budget twice"),
])
def test_suite_mistakes_are_named_for_what_they_are(data, message, tmp_path, capsys):
    assert message in one_line_error(["run", write_suite(tmp_path, {"name": "x", **data}), "--dry-run"], capsys)


def test_a_bad_strategy_parameter_is_named_before_the_baseline_it_replaces(capsys):
    argv = ["run", "strategy-sweep", "--strategies", "h2o:window=8.0", "--dry-run"]  # baseline: dynamic
    assert "strategy 'h2o' parameter window must be a whole number, got 8.0" in one_line_error(argv, capsys)


def test_a_prompt_over_the_context_window_is_refused_for_that_not_for_memory(tmp_path, capsys):
    suite = {"name": "x", "model": "synthetic:tiny", "device": "cpu", "workload": {"kind": "synthetic"},
             "prompt_tokens": [100000], "output_tokens": [8], "trials": 1, "warmup": 0}
    argv = ["run", write_suite(tmp_path, suite), "--out", str(tmp_path / "out"), "--memory-limit", "1MB", "--no-progress"]
    assert ("point dynamic/p100000/o8/b1: a prompt of 100000 tokens + 8 new tokens exceeds the context window of "
            "synthetic:tiny (4096 tokens)") in one_line_error(argv, capsys)


def test_a_multi_model_dry_run_names_every_model(capsys):
    assert main(["run", "model-size-sweep", "--dry-run"]) == 0
    assert "on synthetic:135m, synthetic:1b, smollm2-135m\n" in capsys.readouterr().out.splitlines(keepends=True)[0]


def test_a_conversations_file_that_is_not_utf8_is_refused_by_its_line(tmp_path):
    from kvbench.workloads.conversations import read_conversations
    from kvbench.errors import KvbenchError

    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    path.write_bytes(good + b"\n" + b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    with pytest.raises(KvbenchError, match="chats.jsonl line 2: not a conversation"):
        read_conversations(path)
