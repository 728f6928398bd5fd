"""The interior-reuse benchmark: its workloads, quality against no reuse, the recompute modes and the bar."""

import pytest
from test_workloads import TOK

from kvbench.errors import KvbenchError
from kvbench.workloads import WorkloadSpec, build_requests
from kvbench.workloads.interior import FACTS, KINDS, PREAMBLES


@pytest.fixture(scope="module")
def tiny_text(tiny):
    """The tiny random model with a one-token-per-character tokenizer: text workloads on a fast model."""
    from dataclasses import replace

    return replace(tiny, tokenizer=TOK)


def _texts(name, seed=0, count=4):
    reqs = build_requests(WorkloadSpec(kind=f"reuse:{name}", seed=seed, output_tokens=8), count, TOK, form="ids")
    return reqs, [TOK.decode(r.ids) for r in reqs]


@pytest.mark.parametrize("kind", KINDS)
def test_interior_workloads_are_seeded_and_their_answers_are_in_the_document(kind):
    reqs, texts = _texts(f"interior-{kind}-600")
    again, _ = _texts(f"interior-{kind}-600")
    other, _ = _texts(f"interior-{kind}-600", seed=1)
    assert [r.ids for r in reqs] == [r.ids for r in again] and [r.ids for r in reqs] != [r.ids for r in other]
    assert all(600 <= len(r.ids) <= 900 for r in reqs)  # the document, a one-line preamble and a question
    for r, text in zip(reqs, texts):
        system, rest = text.split("\n\n", 1)
        document, question = rest.rsplit("\n\nQuestion: ", 1)
        assert system.removeprefix("System: ") in PREAMBLES and question.endswith("Answer with the number only.\nAnswer:")
        assert len(r.answers) == 1 and r.answers[0] in document and r.answers[0] not in question
        assert r.score(f" {r.answers[0]}") == 1.0 and r.score(" 0") == 0.0
    assert len({t.split("\n\n", 1)[0] for t in texts}) == 4  # a different system prompt each time
    assert len({r.answers for r in reqs}) == min(4, FACTS)  # and another question
    documents = [t.split("\n\n", 1)[1].rsplit("\n\nQuestion: ", 1)[0] for t in texts]
    if kind == "rag":  # the same documents, in another order every warm request
        parts = [d.split("\n\n") for d in documents]
        assert all(sorted(p) == sorted(parts[0]) and p != parts[0] for p in parts[1:])
    else:
        assert len(set(documents)) == 1


def test_interior_code_puts_each_constant_on_a_line_of_its_own():
    _, texts = _texts("interior-code-600")
    lines = texts[0].splitlines()
    assert sum(line.endswith("_TIMEOUT = " + line.rsplit(" ", 1)[-1]) and line.split(" = ")[0].isupper()
               for line in lines) == FACTS


@pytest.mark.parametrize("name", ["interior-poems-500", "interior-prose", "prose-500", "interior-rag-0"])
def test_unknown_interior_workloads_are_refused(name):
    with pytest.raises(KvbenchError, match="interior-"):
        WorkloadSpec(kind=f"reuse:{name}")


def _interior_run(tmp_path, lm, modes, **fields):
    from kvbench.bench.reuse_session import ReuseSession
    from kvbench.bench.runner import RunOptions, run
    from kvbench.bench.spec import spec_from_dict

    spec = spec_from_dict({"name": "i", "kind": "reuse", "device": "cpu", "workloads": ["interior-records-200"],
                           "modes": modes, "requests": 2, "output_tokens": 4, "teacher_forced": True, **fields})
    options = RunOptions(out=tmp_path / "out", progress=False)
    run(spec, options, ReuseSession(spec, options, lm))
    import json

    return spec, [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_quality_fields_are_measured_against_no_reuse(tmp_path, tiny_text):
    tiny = tiny_text
    from kvbench.bench.quality import distribution_agreement, greedy_agreement
    from kvbench.engine import GenerationConfig, generate
    from kvbench.engine.teacher import teacher_forced_logprobs
    from kvbench.reuse import ReuseCache, ReuseConfig
    from kvbench.strategies import build_strategy
    from kvbench.workloads import for_model

    spec, records = _interior_run(tmp_path, tiny, ["none", "chunk:none"])
    none = [r for r in records if r["mode"] == "none"]
    assert all(r["greedy_agreement"] == 1.0 and r["first_divergence"] is None and r["accuracy"] in (0.0, 1.0)
               for r in none)
    assert [(r["top1_agreement"], r["kl_mean"]) for r in none] == [(None, None), (1.0, 0.0)]  # warm requests only
    warm = next(r for r in records if r["mode"] == "chunk:none" and r["request_index"] == 1)
    assert warm["cached_tokens"] > 100 and warm["exact_tokens"] == 0
    # the same numbers, computed here from scratch: a fresh cache warmed by request 0, then request 1
    requests = build_requests(WorkloadSpec(kind="reuse:interior-records-200", output_tokens=4), 2, for_model(tiny),
                              form="ids")
    dynamic, config = build_strategy("dynamic"), GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    cache = ReuseCache(tiny, ReuseConfig(mode="chunk", recompute="none"))
    generate(tiny, dynamic, [requests[0].ids], config, reuse=cache)
    reference = generate(tiny, dynamic, [requests[1].ids], config).tokens[0]
    expected = distribution_agreement(teacher_forced_logprobs(tiny, dynamic, requests[1].ids, reference),
                                      teacher_forced_logprobs(tiny, dynamic, requests[1].ids, reference, cache))
    assert warm["kl_mean"] == pytest.approx(expected.kl_mean, rel=1e-5) and warm["kl_mean"] > 0
    assert warm["top1_agreement"] == expected.top1_agreement
    assert warm["greedy_agreement"] == greedy_agreement(reference, warm["output_ids"]).fraction


def test_a_budget_in_the_mode_reaches_the_recompute(tmp_path, tiny_text):
    _, records = _interior_run(tmp_path, tiny_text, ["none", "chunk:selective:tokens=8", "chunk:selective:tokens=24"],
                               teacher_forced=False)
    warm = {r["mode"]: r for r in records if r["request_index"] == 1}
    assert warm["chunk:selective:tokens=8"]["recomputed_tokens"] == 8
    assert warm["chunk:selective:tokens=24"]["recomputed_tokens"] == 24
    assert warm["chunk:selective:tokens=8"]["top1_agreement"] is None  # teacher forcing is opt-in


@pytest.mark.parametrize("mode, message", [("chunk:selective:budget=3", "unknown recompute budget 'budget'"),
                                           ("chunk:cacheblend:fraction=lots", "fraction in reuse mode"),
                                           ("chunk:cacheblend:fraction=1.5", "blend_fraction must be in")])
def test_bad_budgets_are_refused_before_a_model_loads(mode, message):
    from kvbench.bench.spec import spec_from_dict

    with pytest.raises(KvbenchError, match=message):
        spec_from_dict({"name": "i", "kind": "reuse", "workloads": ["interior-prose-500"], "modes": ["none", mode]})


def test_the_bar_and_the_report_warn_below_it():
    from types import SimpleNamespace

    from kvbench.report.reuse import body, mode_rows
    from kvbench.reuse.bar import QualityBar

    bar = QualityBar()
    assert bar.shortfalls(0.95, 0.50, 0.52) == ()
    assert bar.shortfalls(0.949, 0.50, 0.53) == ("teacher-forced top-1 agreement 0.949 < 0.95",
                                                "task accuracy 0.50 against 0.53 without reuse (more than 2 points lower)")

    def record(mode, index, top1, accuracy):
        base, _, recompute = mode.partition(":")
        return {"workload": "doc", "mode": mode, "reuse_mode": base, "recompute": recompute or None,
                "tier": "ram" if base != "none" else "-", "trial": 0, "request_index": index, "ttft_ms": 100.0,
                "prompt_tokens": 100, "reuse_ratio": 0.5, "greedy_match": top1 == 1, "greedy_agreement": top1,
                "first_divergence": None if top1 == 1 else 2, "top1_agreement": top1, "kl_mean": 1 - top1,
                "accuracy": accuracy, "recomputed_tokens": 0, "point": f"doc/{mode}", "point_trial": 0}

    records = [record(m, i, t, a) for m, t, a in (("none", 1.0, 1.0), ("chunk:selective", 0.96, 1.0),
                                                   ("chunk:none", 0.90, 0.0)) for i in (0, 1)]
    rows = {r["mode"]: r for r in mode_rows(records)}
    assert rows["chunk:selective"]["shortfalls"] == () and rows["none"]["shortfalls"] == ()
    assert rows["chunk:none"]["diverged"] == 1 and rows["chunk:none"]["first_divergence"] == 2
    report = body(SimpleNamespace(measured=records), None)
    assert report.warnings == ("doc, chunk:none: below the quality bar: teacher-forced top-1 agreement 0.900 < 0.95; "
                               "task accuracy 0.00 against 1.00 without reuse (more than 2 points lower)",)
    quality = next(s for s in report.sections if s.title == "Quality against no reuse")
    assert any("| chunk:none |" in line and "| below |" in line for line in quality.lines)


def test_verify_correctness_measures_against_no_reuse_and_warns_below_the_bar(tiny_text, caplog):
    tiny = tiny_text
    from kvbench.reuse import ReuseConfig, ReusingEngine
    from kvbench.reuse.bar import QualityBar
    from kvbench.workloads import for_model

    requests = build_requests(WorkloadSpec(kind="reuse:interior-prose-200"), 2, for_model(tiny), form="ids")
    engine = ReusingEngine(tiny, ReuseConfig(mode="chunk", recompute="none"))
    engine.warm(requests[0].ids)
    check = engine.verify_correctness(requests[1].ids, max_new_tokens=4, answers=requests[1].answers)
    assert check.reuse.cached_tokens > 100 and check.reuse.exact_tokens == 0  # a chunk hit, not the prompt's own blocks
    assert 0 <= check.top1_agreement <= 1 and check.kl_mean > 0 and check.accuracy in (0.0, 1.0)
    assert check.shortfalls == QualityBar().shortfalls(check.top1_agreement, check.accuracy, check.reference_accuracy)
    strict = engine.verify_correctness(requests[1].ids, max_new_tokens=4, bar=QualityBar(top1_agreement=1.01))
    assert strict.shortfalls and f"below the quality bar: {strict.shortfalls[0]}" in caplog.text
