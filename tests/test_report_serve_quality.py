"""The serve report's comparison with the reference engine and its choice per (rate, KV cap), on hand-made points."""

import pytest

from kvbench.report.serve_quality import QUALITY_BAR, against_reference, choice_section, reference_key


def _records(engine, method, outputs, digest="d", trial=0):
    return [{"engine": engine, "method": method, "trial": trial, "index": i, "status": "ok", "prompt_digest": digest,
             "output_ids": ids, "output_tokens": len(ids)} for i, ids in enumerate(outputs)]


def _fields(engine, method, rate="inf", cap=1):
    return {"engine": engine, "method": method, "request_rate": rate, "kv_cache_memory": cap}


def test_the_reference_is_the_same_axes_at_the_same_rate():
    assert reference_key(_fields("h2o,kv_cache_memory=1MiB", "h2o", "2"), "full") == "full,kv_cache_memory=1MiB@2"
    assert reference_key({**_fields("h2o", None), "method": None}, "full") == "full@inf"


def test_agreement_length_change_and_first_divergence_against_the_reference():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    records = {"full@inf": _records("full", "full", ref),
               "h2o@inf": _records("h2o", "h2o", [[1, 2, 9, 4, 0, 0], [5, 6, 7, 8]])}
    fields = {"full@inf": _fields("full", "full"), "h2o@inf": _fields("h2o", "h2o")}
    out = against_reference(records, fields, "full")
    assert out["full@inf"]["greedy_agreement"] == 1.0 and out["full@inf"]["diverged"] == 0
    h2o = out["h2o@inf"]
    assert h2o["greedy_agreement"] == pytest.approx((3 / 4 + 1) / 2) and h2o["diverged"] == 1
    assert h2o["first_divergence.mean"] == 2 and h2o["output_length_change"] == pytest.approx(5 / 4 - 1)


def test_requests_with_other_prompts_are_not_compared():
    records = {"full@inf": _records("full", "full", [[1, 2]]), "h2o@inf": _records("h2o", "h2o", [[1, 2]], "other")}
    fields = {"full@inf": _fields("full", "full"), "h2o@inf": _fields("h2o", "h2o")}
    assert against_reference(records, fields, "full")["h2o@inf"]["comparable"] is False


def test_the_choice_is_the_best_goodput_at_the_quality_bar_and_names_the_excluded():
    def point(engine, agreement, goodput, cap=2**20):
        return {"engine": engine, "method": engine, "request_rate": "inf", "kv_cache_memory": cap, "comparable": True,
                "greedy_agreement": agreement, "goodput": goodput, "output_throughput": 10.0, "peak_running": 2}

    points = {"full@inf": point("full", 1.0, 1.0), "int8@inf": point("int8", QUALITY_BAR, 1.5),
              "h2o@inf": point("h2o", 0.5, 3.0), "full2@inf": point("full", 1.0, 0.5, cap=2**21)}
    section = choice_section(points, "full", {"ttft_ms": 1000})
    lines = [line for line in section.lines if line.startswith("| inf")]
    assert lines[0].split("|")[3].strip() == "`int8`" and "h2o (0.50)" in lines[0]
    assert lines[1].split("|")[3].strip() == "`full`" and lines[1].rstrip(" |").endswith("none")
