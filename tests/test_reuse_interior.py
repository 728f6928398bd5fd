"""The interior-reuse benchmark: its workloads, quality against no reuse, the recompute modes and the bar."""

import pytest
from test_workloads import TOK

from kvbench.errors import KvbenchError
from kvbench.workloads import WorkloadSpec, build_requests
from kvbench.workloads.interior import FACTS, KINDS, PREAMBLES


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
