"""The `serve` run kind on the tiny model: the engine under kvbench load's arrivals, through the one runner."""

import dataclasses
import json
import math

import pytest
import yaml

from kvbench.bench.records import read_records
from kvbench.bench.runner import RunOptions, run
from kvbench.bench.serve_session import ServeSession
from kvbench.bench.serve_spec import ServeSpec
from kvbench.bench.spec import load_spec, spec_names
from kvbench.bench.steps import STEPS, read_steps
from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.load.arrivals import Arrivals
from kvbench.load.spec import LoadSpec
from kvbench.load.stream import Trace
from kvbench.report import write_report
from kvbench.serve.config import DEFAULT_KV_CACHE_MEMORY
from kvbench.serve.engine import StepStats
from kvbench.workloads import Request

LOAD_FIELDS = set(Trace(Request(0, None, 4), 0.0, 0.0).record())  # every field of a `kvbench load` record
ENGINE_FIELDS = {"queue_ms", "prefill_ms", "preemptions", "cached_tokens", "tier_tokens", "finish_reason", "stream",
                 "max_tokens"}
POINT_FIELDS = {"point", "trial", "warmup", "engine", "kv_backend", "strategy", "max_num_seqs", "request_rate",
                "kv_cache_memory"}
STEP_FIELDS = {f.name for f in dataclasses.fields(StepStats)} | {"step_ms", "point", "trial"}
REQUESTS = 5
SPEC = {
    "kind": "serve", "name": "tiny-serve", "model": "synthetic:tiny", "device": "cpu",
    "workload": {"kind": "synthetic", "prompt_tokens": 8, "max_prompt_tokens": 40, "output_tokens": 3,
                 "max_output_tokens": 6},
    "num_requests": REQUESTS, "request_rates": [200, "inf"], "seed": 3, "slo": {"ttft_ms": 60000},
    "engines": [{"label": "paged", "max_num_seqs": 2, "kv_cache_memory": "1MiB"},
                {"label": "slab", "kv_backend": "contiguous", "max_model_len": 64, "num_blocks": 3}],
}


def _run(spec, out, tiny, **kw):
    options = RunOptions(out=out, progress=False, **kw)
    return run(spec, options, ServeSession(spec, options, tiny))


def test_a_serve_run_records_load_fields_timed_from_the_scheduled_arrival(tmp_path, tiny):
    spec = ServeSpec.from_dict(SPEC)
    out = tmp_path / "out"
    outcome = _run(spec, out, tiny)
    assert outcome.measured == 4
    records = read_records(out / "results.jsonl")
    assert len(records) == 4 * REQUESTS
    for r in records:
        assert LOAD_FIELDS | ENGINE_FIELDS | POINT_FIELDS <= set(r)
        assert sum(r["tier_tokens"].values()) == r["cached_tokens"]
        assert r["status"] == "ok" and r["finish_reason"] == "length" and r["output_tokens"] == r["max_tokens"]
        assert r["sent_s"] == r["scheduled_s"] and r["send_lag_ms"] == 0.0
        assert 0 <= r["queue_ms"] <= r["ttft_ms"] <= r["e2e_ms"]
        assert r["ttft_ms"] == pytest.approx(r["queue_ms"] + r["prefill_ms"])
        assert r["end_s"] == pytest.approx(r["scheduled_s"] + r["e2e_ms"] / 1e3)
        assert len(r["itl_ms"]) == r["output_tokens"] - 1
    at_200 = sorted((r for r in records if r["point"] == "paged@200"), key=lambda r: r["index"])
    assert [r["scheduled_s"] for r in at_200] == Arrivals(200, 1.0, 3).schedule(REQUESTS)
    assert {r["prompt_tokens"] for r in at_200} != {8}  # lengths drawn from U[8, 40]
    assert {r["kv_cache_memory"] for r in records if r["engine"] == "paged"} == {2**20}
    assert {r["kv_cache_memory"] for r in records if r["engine"] == "slab"} == {None}  # sized by num_blocks

    steps = read_steps(out / STEPS)
    assert {(s["point"], s["trial"]) for s in steps} == {(p.key, 0) for p in spec.points()}
    assert STEP_FIELDS <= set(steps[0])
    assert max(s["num_running"] for s in steps if s["engine"] == "paged") == 2  # max_num_seqs held
    assert max(s["num_running"] for s in steps if s["engine"] == "slab") == 3  # three slabs: three at once

    write_report(out)
    summary = json.loads((out / "summary.json").read_text())["points"]
    assert list(summary) == [p.key for p in spec.points()]
    for key, point in summary.items():
        mine = [r for r in records if r["point"] == key]
        wall = max(r["end_s"] for r in mine)
        assert point["output_throughput"] == pytest.approx(sum(r["output_tokens"] for r in mine) / wall)
        assert point["request_throughput"] == pytest.approx(REQUESTS / wall)
        assert point["goodput"] == pytest.approx(REQUESTS / wall)  # every request within a 60 s TTFT
        assert point["ttft_ms.p99"] == pytest.approx(max(r["ttft_ms"] for r in mine), rel=0.05)
        theirs = [s for s in steps if s["point"] == key]
        assert point["peak_running"] == max(s["num_running"] for s in theirs)
        assert point["kv_used_bytes"] == max(s["kv_bytes_used"] for s in theirs)
        assert point["kv_reserved_bytes"] == max(s["kv_bytes_reserved"] for s in theirs)
        assert point["kv_reserved_over_used"] >= 1
    # a contiguous slab reserves max_model_len tokens per request, whatever it holds
    assert summary["slab@inf"]["kv_reserved_over_used"] > summary["paged@inf"]["kv_reserved_over_used"]
    assert (out / "figures" / "latency_vs_rate.png").exists() and (out / "figures" / "kv_over_time.png").exists()


def test_resume_measures_only_missing_trials_and_drops_steps_of_cut_ones(tmp_path, tiny):
    spec = ServeSpec.from_dict({**SPEC, "engines": SPEC["engines"][:1], "request_rates": ["inf"]})
    out = tmp_path / "out"
    _run(spec, out, tiny)
    with open(out / STEPS, "a") as fh:  # steps a trial cut before its records were written would leave
        fh.write(json.dumps({"point": "paged@inf", "trial": 1, "step": 0}) + "\n")
    outcome = _run(spec.resolved(trials=2), out, tiny, resume=True)
    assert (outcome.measured, outcome.skipped) == (1, 1)
    steps = read_steps(out / STEPS)
    assert sorted({s["trial"] for s in steps}) == [0, 1]
    assert all("num_running" in s for s in steps)  # the cut trial's line is gone
    assert len(read_records(out / "results.jsonl")) == 2 * REQUESTS


def test_warmup_trials_are_marked_and_leave_no_steps(tmp_path, tiny):
    spec = ServeSpec.from_dict({**SPEC, "engines": SPEC["engines"][:1], "request_rates": ["inf"], "warmup": 1})
    _run(spec, tmp_path / "out", tiny)
    records = read_records(tmp_path / "out" / "results.jsonl")
    assert sum(r["warmup"] for r in records) == sum(not r["warmup"] for r in records) == REQUESTS
    assert {s["trial"] for s in read_steps(tmp_path / "out" / STEPS)} == {0}


def test_a_pool_over_the_memory_limit_is_refused_before_anything_runs(tmp_path, tiny):
    spec = ServeSpec.from_dict({**SPEC, "engines": [{"kv_cache_memory": "4GiB"}]})
    with pytest.raises(KvbenchError, match="refusing to run.*KV 4.00 GiB"):
        _run(spec, tmp_path / "out", tiny, memory_limit=2**31)
    assert not (tmp_path / "out" / "results.jsonl").exists() or not read_records(tmp_path / "out" / "results.jsonl")


def test_a_request_the_pool_cannot_hold_is_refused_before_anything_runs(tmp_path, tiny):
    spec = ServeSpec.from_dict({**SPEC, "engines": [{"num_blocks": 2, "block_size": 4}]})
    with pytest.raises(KvbenchError, match="KV blocks but the pool has 2"):
        _run(spec, tmp_path / "out", tiny)


def test_arrivals_are_those_of_kvbench_load():
    common = {"request_rates": [4.0, math.inf], "burstiness": 0.5, "seed": 7, "num_requests": 30}
    serve = ServeSpec.from_dict({"name": "s", **common})
    load = LoadSpec.from_dict({"name": "l", "url": "http://127.0.0.1:9/v1", **common})
    for rate in (4.0, math.inf):
        assert [t for _, t in serve.schedule(rate)] == load.schedule(rate)


def test_streams_join_the_schedule_with_their_own_arrivals():
    spec = ServeSpec.from_dict({"name": "s", "num_requests": 3, "streams": [
        {"tag": "long", "workload": {"prompt_tokens": 64}, "num_requests": 2, "request_rate": 2, "start_s": 1.5}]})
    schedule = spec.schedule(math.inf)
    assert schedule[:3] == [("main", 0.0)] * 3
    assert [tag for tag, _ in schedule[3:]] == ["long", "long"] and schedule[3][1] == 1.5 < schedule[4][1]


def _dry_run_error(tmp_path, capsys, engines) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"kind": "serve", "name": "s", "engines": engines}))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbench: error: ") and err.count("\n") == 1, err
    return err


def test_bad_engine_fields_give_one_line_naming_the_valid_ones(tmp_path, capsys):
    err = _dry_run_error(tmp_path, capsys, [{"kv_backnd": "paged"}])
    assert "unknown engine key(s) kv_backnd; valid: admission, batching, block_size, chunked_prefill" in err
    assert "kv_backend must be one of paged, contiguous, per_seq, got 'slab'" in _dry_run_error(
        tmp_path, capsys, [{"kv_backend": "slab"}])
    assert "engine key max_num_seqs must be a whole number, got '8'" in _dry_run_error(
        tmp_path, capsys, [{"max_num_seqs": "8"}])
    assert "cannot read memory size 'lots'" in _dry_run_error(tmp_path, capsys, [{"kv_cache_memory": "lots"}])
    assert "engine labels repeat" in _dry_run_error(tmp_path, capsys, [{"label": "a"}, {"label": "a", "block_size": 8}])


SERVE_SUITES = [name for name in spec_names() if load_spec(name).kind == "serve"]


def test_the_serving_suites_ship():
    assert {"paged-vs-contiguous", "continuous-batching", "request-rate", "chunked-prefill",
            "preemption"} <= set(SERVE_SUITES)


@pytest.mark.parametrize("name", SERVE_SUITES)
@pytest.mark.parametrize("quick", [False, True])
def test_every_serving_suite_parses_and_lists_its_points(name, quick, capsys):
    spec = load_spec(name).resolved(quick)
    assert main(["run", name, "--dry-run", *(["--quick"] if quick else [])]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{name} (serve): {len(spec.points())} points")
    assert [line.strip() for line in printed[1:]] == [p.key for p in spec.points()]
    for engine in spec.engines:
        engine.config  # every variant is a valid EngineConfig


def test_per_seq_and_swap_engines_run_through_the_serve_kind(tmp_path, tiny):
    """Every EngineConfig field passes through: a per_seq strategy engine, and swap preemption under a pool
    too small for the requests at once (its swaps land in the records and the report)."""
    spec = ServeSpec.from_dict({**SPEC, "request_rates": ["inf"], "engines": [
        {"label": "seq", "kv_backend": "per_seq", "strategy": "dynamic", "max_num_seqs": 3},
        {"label": "swap", "preemption": "swap", "num_blocks": 7, "block_size": 8, "max_num_seqs": 4}]})
    out = tmp_path / "out"
    assert _run(spec, out, tiny).measured == 2
    records = read_records(out / "results.jsonl")
    assert {r["kv_backend"] for r in records} == {"per_seq", "paged"}
    assert all(r["status"] == "ok" and r["output_tokens"] == r["max_tokens"] for r in records)
    swapped = [r for r in records if r["engine"] == "swap"]
    assert sum(r["swaps"] for r in swapped) > 0
    steps = [s for s in read_steps(out / STEPS) if s["engine"] == "swap"]
    assert sum(r["bytes_swapped"] for r in swapped) == sum(s["bytes_swapped"] for s in steps) > 0
    write_report(out)
    summary = json.loads((out / "summary.json").read_text())["points"]
    assert summary["swap@inf"]["bytes_swapped"] == sum(s["bytes_swapped"] for s in steps)
    assert summary["seq@inf"]["swaps"] == 0
    assert json.loads((out / "run.json").read_text())["points"]["seq@inf"]["kv_pool_bytes"] == \
        DEFAULT_KV_CACHE_MEMORY // tiny.kv_bytes_per_token * tiny.kv_bytes_per_token


def test_engine_axes_cross_every_engine_and_name_the_reference():
    spec = ServeSpec.from_dict({**SPEC, "engine_axes": {"kv_cache_memory": ["1MiB", "2MiB"], "max_num_seqs": [1, 3]},
                                "reference": "slab", "engines": [{"label": "a"}, {"label": "slab", "block_size": 8}]})
    variants = spec.variants()
    assert [v.label for v in variants][:2] == ["a,kv_cache_memory=1MiB,max_num_seqs=1",
                                               "a,kv_cache_memory=1MiB,max_num_seqs=3"]
    assert len(variants) == 8 and len(spec.points()) == 8 * 2 and spec.reference_engine == "slab"
    last = variants[-1]
    assert last.base == "slab" and last.config.kv_cache_memory == 2 * 2**20 and last.config.max_num_seqs == 3
    assert last.config.block_size == 8
    assert ServeSpec.from_dict(spec.to_dict()) == spec  # the spec keeps its axes, not the crossed engines
    with pytest.raises(KvbenchError, match="reference 'nope' is not an engine label; valid: a, slab"):
        ServeSpec.from_dict({**SPEC, "reference": "nope", "engines": [{"label": "a"}, {"label": "slab"}]})
    with pytest.raises(KvbenchError, match="engine_axes key max_num_seqs must be a whole number"):
        ServeSpec.from_dict({**SPEC, "engine_axes": {"max_num_seqs": ["x"]}})
    with pytest.raises(KvbenchError, match="engine_axes block_size repeats a value"):
        ServeSpec.from_dict({**SPEC, "engine_axes": {"block_size": [8, 8]}})


def test_per_seq_methods_are_compared_with_the_reference_on_the_same_requests(tmp_path, tiny):
    """Records carry the prompt digest, output ids, budget and bytes moved; the report compares each engine
    with the reference: h2o at budget 1.0 agrees exactly, offloading moves bytes, and one engine is chosen."""
    spec = ServeSpec.from_dict({**SPEC, "request_rates": ["inf"], "ignore_eos": False,
                                "workload": {"kind": "synthetic", "prompt_tokens": 24, "output_tokens": 6},
                                "engine_axes": {"kv_cache_memory": ["1MiB"]}, "engines": [
        {"label": "full", "kv_backend": "per_seq", "strategy": "dynamic"},
        {"label": "h2o-1.0", "kv_backend": "per_seq", "strategy": "h2o:budget=1.0:window=4"},
        {"label": "off", "kv_backend": "per_seq", "strategy": "offloaded"}]})
    out = tmp_path / "out"
    assert _run(spec, out, tiny).measured == 3
    records = read_records(out / "results.jsonl")
    by_engine = {}
    for r in records:
        by_engine.setdefault(r["method"], []).append(r)
        assert len(r["output_ids"]) == r["output_tokens"] and len(r["prompt_digest"]) == 16
    assert {r["budget"] for r in by_engine["h2o-1.0"]} == {1.0} and by_engine["full"][0]["budget"] is None
    assert all(r["bytes_moved"] > 0 for r in by_engine["off"]) and by_engine["full"][0]["bytes_moved"] is None
    assert [r["output_ids"] for r in by_engine["h2o-1.0"]] == [r["output_ids"] for r in by_engine["full"]]
    write_report(out)
    summary = json.loads((out / "summary.json").read_text())
    points = summary["points"]
    assert summary["reference"] == "full"
    h2o = points["h2o-1.0,kv_cache_memory=1MiB@inf"]
    assert h2o["greedy_agreement"] == 1.0 and h2o["diverged"] == 0 and h2o["output_length_change"] == 0.0
    off = points["off,kv_cache_memory=1MiB@inf"]
    moved = sum(r["bytes_moved"] for r in by_engine["off"])
    assert off["bytes_moved_per_token"] == moved / sum(r["output_tokens"] for r in by_engine["off"])
    report = (out / "report.md").read_text()
    assert "## Against the reference engine `full`" in report and "## Which engine for my workload and budget" in report
    assert "host-to-host" in report


def test_a_per_seq_pool_is_bounded_by_its_requests_not_only_by_its_cap(tiny):
    from kvbench.bench.serve_session import pool_bytes_bound
    from kvbench.serve import EngineConfig

    requests = [Request(0, None, 6, ids=list(range(10))), Request(1, None, 4, ids=list(range(20)))]
    huge = EngineConfig(kv_backend="per_seq", kv_cache_memory=64 * 2**30, strategy="speculative_fetch")
    token = tiny.kv_bytes_per_token
    head_dim = getattr(tiny.config, "head_dim", None) or tiny.config.hidden_size // tiny.config.num_attention_heads
    per_token = token + token * min(16, head_dim) // (2 * head_dim)  # full KV and the partial keys
    assert pool_bytes_bound(huge, tiny, requests) == (16 + 24) * per_token
    small = EngineConfig(kv_backend="per_seq", kv_cache_memory=2**10)
    assert pool_bytes_bound(small, tiny, requests) == 2**10
