"""The serve report's comparison with the reference engine and its choice per (rate, KV cap), on hand-made points."""

import pytest

from kvbench.report.serve_quality import QUALITY_BAR, against_reference, choice_section, quality_section, reference_key


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


def test_task_accuracy_is_shown_beside_the_references():
    def point(engine, accuracy):
        return {"engine": engine, "method": engine, "request_rate": "inf", "kv_cache_memory": 1, "comparable": True,
                "budget": None, "output_tokens.mean": 4.0, "output_length_change": 0.0, "greedy_agreement": 1.0,
                "diverged": 0, "pairs": 2, "first_divergence.mean": None, "accuracy": accuracy}

    points = {"full@inf": point("full", 0.75), "h2o@inf": point("h2o", 0.25), "int8@inf": point("int8", float("nan"))}
    lines = [line for line in quality_section(points, "full", True).lines if line.startswith("| ")]
    cells = {line.split("|")[1].strip(): line.split("|")[8].strip() for line in lines[1:]}
    assert cells == {"full@inf": "0.75 (0.75)", "h2o@inf": "0.25 (0.75)", "int8@inf": ""}


def test_a_needle_output_scores_one_only_when_it_holds_every_answer():
    from kvbench.bench.serve_session import Planned, task_score
    from kvbench.workloads.request import Request

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    class Served:
        output_ids = [41, 7]

    def planned(answers):
        return Planned(0, "main", 0.0, Request(0, ("q",), 4, answers=answers))

    assert task_score(Served, planned(("41",)), Tok()) == {"accuracy": 1.0}
    assert task_score(Served, planned(("41", "8")), Tok()) == {"accuracy": 0.0}
    assert task_score(Served, planned(()), Tok()) == {"accuracy": None}
