import json

import pytest

from kvbench.bench.records import read_records
from kvbench.report import write_report
from kvbench.bench.runner import RunOptions, run
from kvbench.bench.spec import load_spec
from kvbench.bench.suite_session import SuiteSession
from kvbench.errors import KvbenchError

FIELDS = {"suite", "strategy", "model", "prompt_tokens", "output_tokens", "batch_size", "trial", "ttft_ms", "tpot_ms",
          "e2e_ms", "decode_tokens_per_s", "kv_cache_bytes", "peak_mem_bytes", "mem_kind"}


def _run(spec, out, tiny, **kw):
    options = RunOptions(out=out, progress=False, **kw)
    return run(spec, options, SuiteSession(spec, options, tiny))


def test_run_writes_one_record_per_trial(tiny_suite, tmp_path, tiny):
    spec = load_spec(str(tiny_suite))
    outcome = _run(spec, tmp_path / "out", tiny)
    records = read_records(tmp_path / "out" / "results.jsonl")
    measured = [r for r in records if not r["warmup"]]
    assert outcome.measured == len(measured) == 4 * 2
    assert len(records) - len(measured) == 4  # one warmup per point, recorded as such
    assert FIELDS <= set(measured[0])
    assert {r["prompt_tokens"] for r in measured} == {16, 32}
    assert all(r["output_tokens"] == 4 for r in measured)
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["spec"]["name"] == "tiny" and info["models"]["synthetic:tiny"]["fingerprint"] == tiny.fingerprint
    assert {"python", "torch", "transformers", "kvbench", "device_name"} <= set(info["environment"])


def test_resume_skips_measured_trials(tiny_suite, tmp_path, tiny):
    spec = load_spec(str(tiny_suite))
    out = tmp_path / "out"
    _run(spec.resolved(trials=1), out, tiny)
    outcome = _run(spec, out, tiny, resume=True)  # two trials wanted, one already there
    assert (outcome.measured, outcome.skipped) == (4, 4)
    again = _run(spec, out, tiny, resume=True)
    assert again.measured == 0
    measured = [r for r in read_records(out / "results.jsonl") if not r["warmup"]]
    assert sorted((r["point"], r["trial"]) for r in measured) == sorted({(r["point"], r["trial"]) for r in measured})
    assert len(measured) == 8


def test_existing_results_need_resume(tiny_suite, tmp_path, tiny):
    spec = load_spec(str(tiny_suite))
    _run(spec.resolved(trials=1), tmp_path / "out", tiny)
    with pytest.raises(KvbenchError, match="--resume"):
        _run(spec, tmp_path / "out", tiny)


def test_resume_refuses_a_different_sweep(tiny_suite, tmp_path, tiny):
    spec = load_spec(str(tiny_suite))
    _run(spec.resolved(trials=1), tmp_path / "out", tiny)
    with pytest.raises(KvbenchError, match="different sweep"):
        _run(spec.resolved(prompt_tokens=[8]), tmp_path / "out", tiny, resume=True)


def test_resume_reads_the_stored_spec_when_its_digest_came_from_an_older_formula(tiny_suite, tmp_path, tiny):
    spec = load_spec(str(tiny_suite)).resolved(trials=1)
    out = tmp_path / "out"
    _run(spec, out, tiny)
    info = json.loads((out / "run.json").read_text())
    info["spec_digest"] = "0" * 16  # what an older kvbench computed for the same spec
    (out / "run.json").write_text(json.dumps(info))
    assert _run(spec.resolved(trials=2), out, tiny, resume=True).skipped > 0
    info["spec"]["prompt_tokens"] = [8]
    (out / "run.json").write_text(json.dumps({**info, "spec_digest": "0" * 16}))
    with pytest.raises(KvbenchError, match="different sweep"):
        _run(spec.resolved(trials=2), out, tiny, resume=True)


@pytest.mark.parametrize("field, value, message", [
    ("git_commit", "0" * 40, rf"different kvbench commit \({'0' * 40}, now "),
    ("kvbench", "0.0.1", r"different kvbench version \(0.0.1, now "),
    ("fingerprint", "feedbeef", r"synthetic:tiny with other weights \(fingerprint feedbeef, now "),
])
def test_resume_refuses_another_kvbench_or_other_weights(tiny_suite, tmp_path, tiny, field, value, message):
    spec = load_spec(str(tiny_suite))
    out = tmp_path / "out"
    _run(spec.resolved(trials=1), out, tiny)
    info = json.loads((out / "run.json").read_text())
    (info["models"]["synthetic:tiny"] if field == "fingerprint" else info["environment"])[field] = value
    (out / "run.json").write_text(json.dumps(info))
    with pytest.raises(KvbenchError, match=message + ".*choose another --out"):
        _run(spec, out, tiny, resume=True)
    assert len(read_records(out / "results.jsonl")) == 8  # nothing added


def test_resume_keeps_every_part_in_run_json(tiny_suite, tmp_path, tiny):
    spec = load_spec(str(tiny_suite))
    out = tmp_path / "out"
    _run(spec.resolved(trials=1), out, tiny)
    first = json.loads((out / "run.json").read_text())
    _run(spec, out, tiny, resume=True)
    parts = json.loads((out / "run.json").read_text())["parts"]
    assert len(parts) == 2 and parts[0] == first["parts"][0] == {"written": first["written"],
                                                                  "environment": first["environment"]}


@pytest.mark.parametrize("bad", [b'{"suite": "tiny", "trunc', b'{"suite": "tiny\xff\xfe"}\n'])  # cut off; not UTF-8
def test_corrupt_line_is_reported_and_repair_keeps_good_records(bad, tiny_suite, tmp_path, tiny):
    spec = load_spec(str(tiny_suite)).resolved(trials=1)
    out = tmp_path / "out"
    _run(spec, out, tiny)
    results = out / "results.jsonl"
    good = len(read_records(results))
    with open(results, "ab") as fh:
        fh.write(bad)
    assert "| dynamic/p16/o4/b1 | 1 |" in write_report(out).read_text()  # the report reads past it
    with pytest.raises(KvbenchError, match=rf"line {good + 1} is not a valid JSON record .*{good} good records kept"):
        _run(spec, out, tiny, resume=True)
    assert len(read_records(results, strict=False)) == good
    outcome = _run(spec.resolved(trials=2), out, tiny, resume=True, repair=True)
    assert outcome.skipped == 4 and outcome.measured == 4


def test_unwritable_output_dir(tiny_suite, tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(KvbenchError, match="cannot write to output dir"):
        _run(load_spec(str(tiny_suite)), blocker / "out", tiny)


def test_preflight_refuses_a_sweep_over_the_memory_limit(tiny_suite, tmp_path, tiny):
    with pytest.raises(KvbenchError, match=r"refusing to run: the largest point \(.*p32.*\).*Shrink the sweep"):
        _run(load_spec(str(tiny_suite)), tmp_path / "out", tiny, memory_limit=10_000)
    assert not (tmp_path / "out" / "results.jsonl").exists() or (tmp_path / "out" / "results.jsonl").stat().st_size == 0


def test_report_reads_records_only(tiny_suite, tmp_path, tiny):
    out = tmp_path / "out"
    _run(load_spec(str(tiny_suite)), out, tiny)
    report = write_report(out).read_text()
    assert "| dynamic/p16/o4/b1 | 2 |" in report
    assert "Speedup against `no_cache`" in report
    for figure in ("latency_vs_prompt.png", "strategies.png", "speedup.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
        assert f"figures/{figure}" in report


def test_a_report_counts_each_trial_once_when_two_runs_wrote_it(tiny_suite, tmp_path, tiny):
    out = tmp_path / "out"
    _run(load_spec(str(tiny_suite)), out, tiny)
    results = out / "results.jsonl"
    results.write_text(results.read_text() * 2)  # two runs on one --out, before runs locked it
    assert "| dynamic/p16/o4/b1 | 2 |" in write_report(out).read_text()


def test_report_without_results_says_what_to_do(tmp_path):
    with pytest.raises(KvbenchError, match="has no run.json, which says what kind of run wrote it"):
        write_report(tmp_path)


def test_strategies_take_turns_within_a_shape(tiny_suite, tmp_path, tiny):
    _run(load_spec(str(tiny_suite)), tmp_path / "out", tiny)
    measured = [r for r in read_records(tmp_path / "out" / "results.jsonl") if not r["warmup"]]
    order = [(r["strategy"], r["trial"]) for r in measured if r["target_prompt_tokens"] == 16]
    assert order == [("no_cache", 0), ("dynamic", 0), ("no_cache", 1), ("dynamic", 1)]


def test_quality_is_measured_against_dynamic(tmp_path, tiny):
    from kvbench.models import load_model

    tiny.model.save_pretrained(tmp_path / "model")  # a local model dir counts as real weights
    lm = load_model(str(tmp_path / "model"), device="cpu")
    spec = load_spec(str(_write_suite(tmp_path, f"""
name: quality
model: {tmp_path / 'model'}
workload: {{kind: synthetic}}
strategies: [dynamic, {{name: h2o, window: 4}}, {{name: quantized, bits: 2, residual: 0, sink_tokens: 0}}]
budgets: [24]
baseline: dynamic
quality: true
prompt_tokens: [96]
output_tokens: [8]
trials: 1
warmup: 0
""")))
    _run(spec, tmp_path / "out", lm)
    records = {r["strategy_label"]: r for r in read_records(tmp_path / "out" / "results.jsonl")}
    assert set(records) == {"dynamic", "h2o[budget=24,window=4]", "quantized[bits=2,residual=0,sink_tokens=0]"}
    dynamic = records["dynamic"]
    assert (dynamic["greedy_agreement"], dynamic["first_divergence"], dynamic["top1_agreement"]) == (1.0, None, 1.0)
    assert dynamic["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert records["h2o[budget=24,window=4]"]["budget"] == 24
    int2 = records["quantized[bits=2,residual=0,sink_tokens=0]"]
    assert int2["bits"] == 2 and int2["kl_mean"] > 0
    report = write_report(tmp_path / "out").read_text()
    assert "Quality next to memory and speed" in report
    assert (tmp_path / "out" / "figures" / "pareto.png").exists()


def _write_suite(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path
