"""The reuse and traffic suites: specs, stream orders, report arithmetic, and runs on the embedded model."""

import json
from collections import Counter

import pytest

from kvbench.bench.reuse_session import (ReuseSession, disk_tier_dir, ram_budget, sequence_length, stream_order,
                                         sweep_dead_disk_tiers)
from kvbench.bench.reuse_spec import ReuseSuiteSpec, TrafficSuiteSpec, parse_mode
from kvbench.bench.runner import RunOptions, drop_cut, run
from kvbench.bench.spec import load_spec, spec_from_dict
from kvbench.cli import main
from kvbench.errors import KvbenchError


def test_shipped_reuse_suites_load_and_list_their_sequences():
    reuse, traffic = load_spec("reuse"), load_spec("traffic")
    assert isinstance(reuse, ReuseSuiteSpec) and isinstance(traffic, TrafficSuiteSpec)
    keys = [p.key for p in reuse.points()]
    assert keys[0] == "system-prompt/none/-" and "rag-interior-2000/chunk:cacheblend/ram" in keys
    assert "break-even-2048/prefix/disk" in keys
    assert [p.key for p in traffic.points()] == ["uniform/prefix/ram+disk", "zipf/prefix/ram+disk", "temporal/prefix/ram+disk"]


@pytest.mark.parametrize("data,message", [
    ({"workloads": ["rag-middle-5"]}, "valid: system-prompt"),
    ({"modes": ["none", "chunk:all"]}, "chunk:selective"),
    ({"modes": ["prefix"]}, "needs mode `none`"),
    ({"requests": 1}, "requests and turns must be >= 2"),
    ({"modes": ["none", "prefix", "prefix"]}, "must not repeat"),
    ({"blend_fraction": 0}, "blend_fraction"),
    ({"tiers": ["nvme"]}, "valid: ram, disk"),
    ({"colour": "red"}, "unknown reuse key"),
])
def test_bad_reuse_specs_are_refused(data, message):
    with pytest.raises(KvbenchError, match=message):
        spec_from_dict({"name": "x", "kind": "reuse", **data})


@pytest.mark.parametrize("flag", [["--strategies", "dynamic"], ["--warmup", "2"]])
def test_reuse_suites_refuse_flags_they_would_ignore(flag, capsys):
    assert main(["run", "reuse", "--dry-run", *flag]) == 2
    assert capsys.readouterr().err == f"kvbench: error: 'reuse' is a reuse spec: it takes no {flag[0]}\n"


def test_parse_mode():
    assert parse_mode("none") == ("none", None)
    assert parse_mode("chunk:cacheblend") == ("chunk", "cacheblend")
    with pytest.raises(KvbenchError):
        parse_mode("prefix:selective")


def test_stream_orders_have_their_shape():
    spec = TrafficSuiteSpec(name="t", documents=10, requests=400, zipf_s=1.2, locality=0.8, window=2)
    zipf, uniform, temporal = (stream_order(spec, s, 0) for s in ("zipf", "uniform", "temporal"))
    assert stream_order(spec, "zipf", 0) == zipf  # seeded
    assert Counter(zipf)[0] > 3 * Counter(zipf)[9]
    assert set(uniform) == set(range(10)) and max(Counter(uniform).values()) < 80
    repeats = sum(b in temporal[max(0, i - 3):i + 1] for i, b in enumerate(temporal[1:]))
    assert repeats > 0.7 * len(temporal)


def test_traffic_ram_budget_holds_exactly_ram_documents_documents():
    import torch

    from kvbench.reuse.store import Block, RamTier

    spec = load_spec("traffic")  # 256-token documents, 64-token blocks, RAM for 4 documents
    prompt = spec.document_tokens + 16  # "Document: ", document, question (smollm2): 4 full blocks + 16 tokens
    per_token = 8
    ram = RamTier(ram_budget(spec, prompt, per_token))
    block_bytes = spec.block_size * per_token

    def send(doc: int) -> None:  # what the reuse cache stores for one request: its full blocks
        for b in range(prompt // spec.block_size):
            ram.put(f"{doc}/{b}", Block(torch.zeros(block_bytes // 4), b * spec.block_size, (), ""))

    for doc in range(int(spec.ram_documents)):
        send(doc)
    assert ram.stats.evictions == 0 and ram.stats.bytes == ram.budget  # 4 documents fill it exactly
    send(int(spec.ram_documents))
    assert ram.stats.evictions == prompt // spec.block_size  # the 5th pushes out the whole 1st
    assert {k.split("/")[0] for k in ram.keys()} == {"1", "2", "3", "4"}


@pytest.mark.slow
def test_reuse_suite_runs_resumes_and_reports(tmp_path, capsys):
    suite = tmp_path / "r.yaml"
    suite.write_text("name: r\nkind: reuse\ndevice: cpu\nworkloads: [rag-prefix-500]\nmodes: [none, prefix]\n"
                     "requests: 2\noutput_tokens: 4\nbreak_even: [128]\ntiers: [disk]\n")
    out = tmp_path / "out"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8
    warm = next(r for r in records if r["point"] == "rag-prefix-500/prefix/ram" and r["request_index"] == 1)
    assert warm["cached_tokens"] > 400 and warm["greedy_match"] is True and warm["floor_ms"] > 0
    disk = next(r for r in records if r["point"] == "break-even-128/prefix/disk" and r["request_index"] == 1)
    assert disk["tier_tokens"] == {"disk": disk["cached_tokens"]}
    cold = [r for r in records if r["request_index"] == 0]
    assert all(r["cached_tokens"] == 0 for r in cold)  # cold requests are cold
    assert "Loading against recomputing" in (out / "report.md").read_text()
    assert main(["run", str(suite), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "r: 0 measurements (points x trials), 4 already measured" in capsys.readouterr().out


@pytest.mark.slow
def test_prefix_reuse_on_the_embedded_model_is_identical_over_32_tokens(embedded):
    from kvbench.reuse import ReuseConfig, ReusingEngine
    from kvbench.workloads import WorkloadSpec, build_requests, for_model

    requests = build_requests(WorkloadSpec(kind="reuse:rag-prefix-500"), 3, for_model(embedded), form="ids")
    engine = ReusingEngine(embedded, ReuseConfig(mode="prefix"))
    engine.warm(requests[0].ids)
    for request in requests[1:]:
        check = engine.verify_correctness(request.ids, max_new_tokens=32)
        assert check.identical, f"diverged at token {check.first_divergence}"
        assert check.reuse.exact_tokens >= 448


@pytest.mark.slow
def test_chunk_reuse_of_an_interior_document_agrees_with_no_reuse(embedded):
    """Approximate by design (the document's K/V were computed after another preamble): most, not
    all, requests keep every greedy token; measured 3 of 4 here, the suite publishes the rate."""
    from kvbench.reuse import ReuseConfig, ReusingEngine
    from kvbench.workloads import WorkloadSpec, build_requests, for_model

    requests = build_requests(WorkloadSpec(kind="reuse:rag-interior-500"), 5, for_model(embedded), form="ids")
    engine = ReusingEngine(embedded, ReuseConfig(mode="chunk", recompute="selective"))
    engine.warm(requests[0].ids)
    checks = [engine.verify_correctness(request.ids, max_new_tokens=32) for request in requests[1:]]
    assert all(c.reuse.cached_tokens > 300 and c.reuse.exact_tokens == 0 for c in checks)
    assert sum(c.identical for c in checks) >= 3


def _reuse_run(tmp_path, lm, trials=1, **options):
    spec = spec_from_dict({"name": "r", "kind": "reuse", "device": "cpu", "workloads": ["rag-prefix-64"],
                           "modes": ["none", "prefix"], "requests": 3, "output_tokens": 2, "trials": trials})
    options = RunOptions(out=tmp_path / "out", progress=False, **options)
    return run(spec, options, ReuseSession(spec, options, lm))


def test_reuse_suites_take_repair(capsys):
    assert main(["run", "reuse", "--dry-run", "--repair"]) == 0


def _sizes(spec) -> dict[str, int]:
    return {p.key: sequence_length(spec, p.workload) for p in spec.points()}


def test_records_of_a_sequence_cut_mid_way_are_dropped_from_the_results(tmp_path, capsys):
    spec = spec_from_dict({"name": "r", "kind": "reuse", "workloads": ["rag-prefix-64", "multi-turn"],
                           "modes": ["none", "prefix"], "requests": 3, "turns": 2})
    records = [{"point": p, "trial": t, "request_index": i}
               for p, t, n in (("rag-prefix-64/none/-", 0, 3), ("rag-prefix-64/prefix/ram", 0, 2),
                               ("multi-turn/none/-", 0, 2), ("multi-turn/prefix/ram", 0, 1), ("multi-turn/none/-", 1, 2))
               for i in range(n)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = drop_cut(path, records, _sizes(spec))
    assert {(r["point"], r["trial"]) for r in kept} == {("rag-prefix-64/none/-", 0), ("multi-turn/none/-", 0),
                                                         ("multi-turn/none/-", 1)}
    assert [json.loads(line) for line in path.read_text().splitlines()] == kept and len(kept) == 7
    assert "dropped 3 record(s) of 2 measurement(s) cut mid-way" in capsys.readouterr().out


def test_a_sequence_is_done_only_when_every_request_is_recorded(tmp_path, capsys):
    spec = spec_from_dict({"name": "r", "kind": "reuse", "workloads": ["rag-prefix-64"], "modes": ["none", "prefix"],
                           "requests": 3})
    records = [{"point": p, "trial": 0, "request_index": i}
               for p, indices in (("rag-prefix-64/none/-", (0, 1, 2)), ("rag-prefix-64/prefix/ram", (0, 2, 2)))
               for i in indices]  # three records, but request 1 missing: not done
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = drop_cut(path, records, _sizes(spec))
    assert {r["point"] for r in kept} == {"rag-prefix-64/none/-"} and len(kept) == 3
    assert "dropped 3 record(s) of 1 measurement(s) cut mid-way" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sequence_whose_line_was_deleted_by_hand_is_measured_again_and_counted_once(tmp_path, capsys, embedded):
    """The error on a cut line says to delete it; after that, --resume must not take the sequence as done."""
    _reuse_run(tmp_path, embedded)
    results = tmp_path / "out" / "results.jsonl"
    lines = results.read_text().splitlines()
    assert [json.loads(line)["request_index"] for line in lines[3:]] == [0, 1, 2]  # the prefix sequence
    results.write_text("\n".join(lines[:4] + lines[5:]) + "\n")  # its middle request deleted by hand
    outcome = _reuse_run(tmp_path, embedded, resume=True)
    assert (outcome.measured, outcome.skipped) == (1, 1)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert Counter((r["point"], r["request_index"]) for r in records) == \
        Counter((p, i) for p in ("rag-prefix-64/none/-", "rag-prefix-64/prefix/ram") for i in range(3))
    again = [r for r in records if r["point"].endswith("prefix/ram")]
    assert [r["request_index"] for r in again] == [0, 1, 2] and again[0]["cached_tokens"] == 0


def test_disk_tiers_of_runs_that_were_killed_are_swept(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"kvbench-disk-tier-{dead.stdout.strip()}-abc"
    live = tmp_path / f"kvbench-disk-tier-{os.getpid()}-def"
    other = tmp_path / "kvbench-disk-tier-notapid"
    for path in (orphan, live, other):
        (path / "ns").mkdir(parents=True)
    sweep_dead_disk_tiers(tmp_path)
    assert not orphan.exists() and live.exists() and other.exists()
    with disk_tier_dir() as path:  # what a run makes: named by its pid, so a later run can tell it is orphaned
        assert os.path.basename(path).startswith(f"kvbench-disk-tier-{os.getpid()}-")


@pytest.mark.slow
def test_a_reuse_sequence_cut_mid_way_is_measured_again_from_its_first_request(tmp_path, capsys, embedded):
    _reuse_run(tmp_path, embedded)
    results = tmp_path / "out" / "results.jsonl"
    lines = results.read_text().splitlines()
    assert len(lines) == 6
    # killed while appending the prefix sequence: its first record written, the second cut off
    results.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    with pytest.raises(KvbenchError, match="rerun with --repair"):
        _reuse_run(tmp_path, embedded, resume=True)
    capsys.readouterr()
    outcome = _reuse_run(tmp_path, embedded, resume=True, repair=True)
    out = capsys.readouterr().out
    assert "dropped 1 corrupt or repeated line(s)" in out and "dropped 1 record(s) of 1 measurement(s) cut mid-way" in out
    assert (outcome.measured, outcome.skipped) == (1, 1)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["point"], r["request_index"]) for r in records) == \
        sorted((p, i) for p in ("rag-prefix-64/none/-", "rag-prefix-64/prefix/ram") for i in range(3))
    assert next(r for r in records if r["point"].endswith("prefix/ram") and r["request_index"] == 0)["cached_tokens"] == 0


@pytest.mark.slow
def test_a_reuse_run_resumes_only_with_the_same_weights_and_keeps_every_part(tmp_path, embedded):
    _reuse_run(tmp_path, embedded)
    info_path = tmp_path / "out" / "run.json"
    first = json.loads(info_path.read_text())
    _reuse_run(tmp_path, embedded, trials=2, resume=True)
    info = json.loads(info_path.read_text())
    assert [p["written"] for p in info["parts"]] == [first["written"], info["written"]]
    info["models"]["smollm2-135m"]["fingerprint"] = "feedbeef"
    info_path.write_text(json.dumps(info))
    with pytest.raises(KvbenchError, match="smollm2-135m with other weights \\(fingerprint feedbeef, now "):
        _reuse_run(tmp_path, embedded, trials=3, resume=True)
