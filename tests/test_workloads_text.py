"""The workload library with the embedded model's real tokenizer (chat template, BPE): needle tasks,
lengths a server will count, and prefixes a chat template keeps."""

import pytest

from kvbench.errors import KvbenchError
from kvbench.workloads import WorkloadSpec, build_requests
from kvbench.workloads.needle import make_instance
from kvbench.workloads.tokenizer import context_window, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("task", ["passkey", "multikey", "vartrack"])
def test_task_prompts_hide_the_answer_have_the_length_and_are_scored(tok, task):
    spec = WorkloadSpec(kind="needle", tasks=(task,), depths=(0.5,), prompt_tokens=512, seed=3)
    (request,) = build_requests(spec, 1, tok, form="ids")
    assert (request.task, request.depth) == (task, 0.5)
    assert all(a in request.prompt for a in request.answers)
    assert abs(len(request.ids) - 512) <= 16  # chat template included
    assert build_requests(spec, 1, tok, form="ids") == [request]  # seeded
    assert request.score(f"it is {' '.join(request.answers)}") == 1.0
    assert request.score("no idea") == 0.0
    assert build_requests(spec, 1, tok, form="text")[0].messages == request.messages  # what a server gets


def test_task_arguments_are_checked(tok):
    with pytest.raises(KvbenchError, match="unknown task 'haystack'; valid: passkey, multikey, vartrack"):
        make_instance(tok, "haystack", 512, 0.5)
    with pytest.raises(KvbenchError, match="depth must be in"):
        make_instance(tok, "passkey", 512, 1.5)
    with pytest.raises(KvbenchError, match="too short for the passkey task"):
        make_instance(tok, "passkey", 40, 0.5)


def test_random_prompts_are_near_the_target_length_for_a_server(tok):
    (req,) = build_requests(WorkloadSpec(kind="random", prompt_tokens=64), 1, tok, form="text")
    assert abs(len(tok.encode(req.prompt, add_special_tokens=False)) - 64) <= 8


@pytest.mark.parametrize("kind", ["text", "sharegpt-lengths"])
def test_corpus_slices_round_trip_through_text(tok, kind):
    """A slice of one encoded text is sent as its decoded text, which the server tokenizes to the same ids."""
    spec = WorkloadSpec(kind=kind, prompt_tokens=256)
    for a, b in zip(build_requests(spec, 4, tok, form="ids"), build_requests(spec, 4, tok, form="text"), strict=True):
        assert tok.encode(b.prompt, add_special_tokens=False) == a.ids


def test_multi_turn_ids_extend_the_previous_turn_through_the_chat_template(tok):
    spec = WorkloadSpec(kind="multi-turn", conversations=1, turns=3, prompt_tokens=24, output_tokens=8)
    reqs = build_requests(spec, 3, tok, form="ids")
    for earlier, later in zip(reqs, reqs[1:]):
        assert later.ids[:len(earlier.ids)] == earlier.ids and len(later.ids) > len(earlier.ids)


def test_text_prompts_as_written_run_in_the_chat_template(tok):
    (req,) = build_requests(WorkloadSpec(kind="text", prompt_tokens=None, prompts=("Hi there",)), 1, tok, form="ids")
    assert tok.decode(req.ids).rstrip().endswith("assistant") and "Hi there" in tok.decode(req.ids)


def test_the_embedded_tokenizer_knows_its_context_window_from_the_model_config(tok):
    assert context_window(tok) == 8192
