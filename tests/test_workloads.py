"""The workload library on a one-token-per-character tokenizer: fast, exact lengths, exact round trips."""

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from kvbench.bench.spec import spec_from_dict
from kvbench.errors import KvbenchError
from kvbench.load.session import fit_context, rate_requests
from kvbench.load.spec import DEFAULT_REQUESTS, LoadSpec
from kvbench.workloads import WorkloadSpec, build_requests
from kvbench.workloads.conversations import read_conversations
from kvbench.workloads.request import ids_of, user
from kvbench.workloads.sharegpt import length_mix
from kvbench.workloads.tokenizer import ModelTokenizer


class CharTokenizer:
    """One token per character: exact round trips, so lengths can be checked."""

    vocab_size = 256

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 256 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()
GENERATED = ["synthetic", "text", "prefix-repetition", "multi-turn", "sharegpt-lengths", "reuse:rag-interior-300",
             "reuse:multi-turn", "reuse:few-shot"]
SMALL = dict(prompt_tokens=40, output_tokens=6, prefix_tokens=60, prefixes=2, suffixes=2, conversations=2, turns=2)


def conversations(tmp_path, texts):
    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps({"messages": [user(t)]}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("kind", GENERATED)
def test_each_workload_is_fixed_by_its_seed(kind):
    spec = WorkloadSpec(kind=kind, seed=3, **SMALL)
    first = build_requests(spec, 4, TOK, form="ids")
    assert len(first) == 4 and [r.index for r in first] == [0, 1, 2, 3]
    assert build_requests(spec, 4, TOK, form="ids") == first
    assert build_requests(replace(spec, seed=4), 4, TOK, form="ids") != first


@pytest.mark.parametrize("kind", GENERATED + ["needle", "text-as-written", "jsonl"])
def test_the_ids_and_text_forms_are_the_same_requests(kind, tmp_path):
    """Token-level workloads are sent as their decoded ids; message-level ones run as their messages' ids."""
    spec = WorkloadSpec(kind=kind, **SMALL) if kind in GENERATED else {
        "needle": WorkloadSpec(kind="needle", prompt_tokens=400, depths=(0.5,)),
        "text-as-written": WorkloadSpec(kind="text", prompt_tokens=None),
        "jsonl": WorkloadSpec(kind=str(conversations(tmp_path, ["hi", "there"]))),
    }[kind]
    as_ids, as_text = build_requests(spec, 4, TOK, form="ids"), build_requests(spec, 4, TOK, form="text")
    for a, b in zip(as_ids, as_text, strict=True):
        assert replace(a, ids=None, messages=None) == replace(b, ids=None, messages=None)  # the same metadata
        if b.ids is None:  # defined as messages: the in-process ids are those messages, tokenized
            assert a.messages == b.messages and a.ids == ids_of(b.messages, TOK)
        elif kind != "synthetic":  # defined as ids: the server gets their text
            assert b.ids == a.ids and TOK.encode(b.prompt) == a.ids


def test_synthetic_ids_have_the_exact_length_and_random_text_about_it():
    spec = WorkloadSpec(kind="random", prompt_tokens=20, output_tokens=7, seed=1)
    ids = build_requests(spec, 3, TOK, form="ids")
    assert [len(r.ids) for r in ids] == [20, 20, 20] and ids[0].ids != ids[1].ids and ids[0].max_tokens == 7
    assert ids == build_requests(replace(spec, kind="synthetic"), 3, TOK, form="ids")  # one workload, two names
    text = build_requests(spec, 3, TOK, form="text")
    assert [len(r.prompt) for r in text] == [20, 20, 20] and text[0].prompt != text[1].prompt
    assert [r.prompt for r in text] == [r.prompt for r in build_requests(spec, 3, TOK, form="text")]


def test_synthetic_lengths_drawn_uniformly_where_a_max_is_set():
    spec = WorkloadSpec(prompt_tokens=64, max_prompt_tokens=1024, output_tokens=16, max_output_tokens=512, seed=2)
    requests = build_requests(spec, 2000, TOK, form="ids")
    prompts, outputs = np.array([len(r.ids) for r in requests]), np.array([r.max_tokens for r in requests])
    assert prompts.min() >= 64 and prompts.max() <= 1024 and outputs.min() >= 16 and outputs.max() <= 512
    assert prompts.mean() == pytest.approx(544, rel=0.05) and outputs.mean() == pytest.approx(264, rel=0.05)
    assert prompts.std() == pytest.approx((961**2 - 1) ** 0.5 / 12**0.5, rel=0.05)  # discrete uniform's spread
    assert requests[:5] == build_requests(spec, 5, TOK, form="ids")  # request i depends on (seed, i) only
    fixed_output = build_requests(replace(spec, max_output_tokens=None), 50, TOK, form="ids")
    assert {r.max_tokens for r in fixed_output} == {16} and len({len(r.ids) for r in fixed_output}) > 1
    with pytest.raises(KvbenchError, match="max_prompt_tokens must be >= prompt_tokens"):
        WorkloadSpec(prompt_tokens=64, max_prompt_tokens=32)
    with pytest.raises(KvbenchError, match="synthetic workloads only, not of 'needle'"):
        WorkloadSpec(kind="needle", prompt_tokens=64, max_prompt_tokens=128)
    with pytest.raises(KvbenchError, match="max_output_tokens must be >= output_tokens"):
        WorkloadSpec(output_tokens=64, max_output_tokens=8)


def test_text_slices_have_the_exact_length_and_their_true_continuation():
    spec = WorkloadSpec(kind="text", prompt_tokens=50, output_tokens=8)
    reqs = build_requests(spec, 2, TOK, form="ids")
    assert [(len(r.ids), len(r.continuation)) for r in reqs] == [(50, 8), (50, 8)] and reqs[0].ids != reqs[1].ids
    as_written = build_requests(replace(spec, prompt_tokens=None, prompts=("a", "b")), 3, TOK, form="text")
    assert [r.prompt for r in as_written] == ["a", "b", "a"]


def test_prefix_repetition_shares_prefixes_in_order():
    spec = WorkloadSpec(kind="prefix-repetition", prefixes=2, suffixes=3, prefix_tokens=30, prompt_tokens=10)
    reqs = build_requests(spec, spec.natural_count, TOK, form="ids")
    assert len(reqs) == 6 and all(len(r.ids) == 30 + 2 + 10 for r in reqs)
    assert [r.prefix_id for r in reqs] == [0, 0, 0, 1, 1, 1]
    assert [r.shared_prefix for r in reqs] == [False, True, True, False, True, True]
    assert reqs[0].ids[:30] == reqs[2].ids[:30] != reqs[3].ids[:30]  # shared at the token level
    assert len({tuple(r.ids) for r in reqs}) == 6  # every suffix differs
    more = build_requests(spec, 8, TOK, form="ids")
    assert [(r.prefix_id, r.shared_prefix) for r in more[6:]] == [(0, True), (0, True)]  # the next cycle


def test_multi_turn_prompts_extend_the_previous_turn():
    spec = WorkloadSpec(kind="multi-turn", conversations=2, turns=3, prompt_tokens=12, output_tokens=5)
    reqs = build_requests(spec, spec.natural_count, TOK, form="text")
    assert [(r.turn, r.prefix_id) for r in reqs] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    conv0 = [r for r in reqs if r.prefix_id == 0]
    for earlier, later in zip(conv0, conv0[1:]):
        assert later.messages[:len(earlier.messages)] == earlier.messages
        assert later.messages[len(earlier.messages)]["role"] == "assistant"
    assert [r.shared_prefix for r in reqs] == [False, False, True, True, True, True]


def test_reuse_sequences_share_what_they_promise():
    reqs = build_requests(WorkloadSpec(kind="reuse:rag-interior-500", output_tokens=4), 3, TOK, form="text")
    document = reqs[0].prompt[reqs[0].prompt.index("Document: "):][:500]
    assert all(document in r.prompt for r in reqs)
    assert len({r.prompt.split("Document: ")[0] for r in reqs}) == 3  # a different preamble each
    # the document is shared, but after a different preamble: no request shares a prefix
    assert [(r.prefix_id, r.shared_prefix) for r in reqs] == [(0, False), (1, False), (2, False)]
    assert reqs[0].max_tokens == 4
    prefixed = build_requests(WorkloadSpec(kind="reuse:rag-prefix-500"), 3, TOK, form="ids")
    assert [(r.prefix_id, r.shared_prefix) for r in prefixed] == [(0, False), (0, True), (0, True)]
    assert prefixed[0].ids[:len("Document: ") + 500] == prefixed[2].ids[:len("Document: ") + 500]
    turns = build_requests(WorkloadSpec(kind="reuse:multi-turn"), 3, TOK, form="ids")
    assert [r.turn for r in turns] == [1, 2, 3] and turns[2].ids[:len(turns[1].ids)] == turns[1].ids
    with pytest.raises(KvbenchError, match="unknown reuse workload 'rag-middle-5'"):
        WorkloadSpec(kind="reuse:rag-middle-5")


def test_the_length_mix_matches_its_shipped_distribution():
    prompts, outputs = length_mix()
    spec = WorkloadSpec(kind="sharegpt-lengths", seed=7)
    n = 600
    reqs = build_requests(spec, n, TOK, form="ids")
    drawn_prompts, drawn_outputs = [len(r.ids) for r in reqs], [r.max_tokens for r in reqs]
    assert min(drawn_prompts) >= 4 and max(drawn_prompts) <= 1024 and max(drawn_outputs) <= 1024
    for drawn, dist in ((drawn_prompts, prompts), (drawn_outputs, outputs)):
        error = math.sqrt(dist.variance() / n)  # standard error of the mean of n draws
        assert abs(np.mean(drawn) - dist.mean()) < 4 * error
    assert abs(prompts.mean() - 138.45) < 0.01 and abs(outputs.mean() - 281.60) < 0.01  # the table's own means
    assert build_requests(spec, 5, TOK, form="ids") == reqs[:5]


def test_conversation_files_in_sharegpt_and_openai_form(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text("\n".join([
        json.dumps({"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}, {"from": "human", "value": "more"}]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"}]}),
    ]))
    convs = read_conversations(path)
    assert convs == [({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}),
                     ({"role": "user", "content": "what is 2+2?"},)]
    spec = WorkloadSpec(kind=str(path), output_tokens=9)
    assert spec.natural_count == 2 and not spec.needs_tokenizer
    reqs = build_requests(spec, 3, None, form="text")
    assert reqs[2].messages == reqs[0].messages and reqs[0].prompt == "be brief\n\nhi" and reqs[0].ids is None


def test_bad_conversation_files_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n{not json\n")
    with pytest.raises(KvbenchError, match="bad.jsonl line 2: not a conversation"):
        read_conversations(path)
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "no user"}]}))
    with pytest.raises(KvbenchError, match="line 1"):
        read_conversations(path)
    with pytest.raises(KvbenchError, match="cannot read workload file"):
        read_conversations(tmp_path / "missing.jsonl")


def test_workload_validation(tmp_path):
    with pytest.raises(KvbenchError, match="unknown workload 'nope'; valid: synthetic, random, text"):
        WorkloadSpec(kind="nope")
    with pytest.raises(KvbenchError, match="prefixes must be >= 1"):
        WorkloadSpec(prefixes=0)
    with pytest.raises(KvbenchError, match="unknown task"):
        WorkloadSpec(kind="needle", tasks=("haystack",))
    with pytest.raises(KvbenchError, match="needs a tokenizer"):
        build_requests(WorkloadSpec(), 1, None, form="text")
    with pytest.raises(KvbenchError, match="needs a tokenizer"):  # in-process, even conversations are ids
        build_requests(WorkloadSpec(kind=str(conversations(tmp_path, ["hi"]))), 1, None, form="ids")
    with pytest.raises(KvbenchError, match="needs prompt_tokens"):
        build_requests(WorkloadSpec(prompt_tokens=None), 1, TOK, form="ids")
    with pytest.raises(KvbenchError, match="unknown request form"):
        build_requests(WorkloadSpec(), 1, TOK, form="tokens")
    no_tokenizer = ModelTokenizer("synthetic:tiny", 512)
    assert len(build_requests(WorkloadSpec(prompt_tokens=8), 1, no_tokenizer, form="ids")[0].ids) == 8
    with pytest.raises(KvbenchError, match="model 'synthetic:tiny' has no tokenizer"):
        build_requests(WorkloadSpec(kind="text"), 1, no_tokenizer, form="ids")


def test_a_suite_takes_any_workload_and_sweeps_the_lengths_itself():
    spec = spec_from_dict({"name": "x", "workload": {"kind": "prefix-repetition", "prefixes": 2},
                      "prompt_tokens": [64], "output_tokens": [8]})
    assert spec.workload == WorkloadSpec(kind="prefix-repetition", prefixes=2)
    assert spec.resolved(trials=1).workload == spec.workload
    with pytest.raises(KvbenchError, match="workload key.s. prompt_tokens belong to the suite"):
        spec_from_dict({"name": "x", "workload": {"kind": "synthetic", "prompt_tokens": 64}})
    with pytest.raises(KvbenchError, match="workload key seed must be a whole number"):
        spec_from_dict({"name": "x", "workload": {"seed": "1"}})


def test_the_library_imports_without_torch():
    code = ("import sys, kvbench.workloads as w\n"
            "from kvbench.workloads.tokenizer import context_window, fitting_requests, load_tokenizer\n"
            "assert w.build_requests(w.WorkloadSpec(kind='sharegpt-lengths'), 2, None or type('T', (), {"
            "'vocab_size': 256, 'encode': lambda s, t, add_special_tokens=True: [ord(c) % 256 for c in t], "
            "'decode': lambda s, i, skip_special_tokens=False: ''.join(map(chr, i))})(), form='text')\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reuse_load_counts_fit_the_context_window():
    tok = CharTokenizer()
    tok.model_max_length = 2000
    config = LoadSpec(url="http://x", workload=WorkloadSpec(kind="reuse:multi-turn", output_tokens=10))
    schedules = {"inf": config.schedule(math.inf)}
    requests = rate_requests(config, {"inf": len(schedules["inf"])}, tok)
    assert fit_context(config, requests, schedules, tok) == 2000
    fit = len(requests["inf"])
    assert 1 < fit < DEFAULT_REQUESTS and len(schedules["inf"]) == fit  # the default count, cut to what fits
    assert all(len(r.prompt) + 10 <= 2000 for r in requests["inf"])
    asked = replace(config, num_requests=fit + 1)
    with pytest.raises(KvbenchError, match=f"request {fit + 1} of the reuse:multi-turn workload does not fit the "
                                           f"tokenizer's 2000-token context with 10 output tokens; give --num-requests {fit}$"):
        fit_context(asked, rate_requests(asked, {"inf": fit + 1}, tok), {"inf": asked.schedule(math.inf)}, tok)


def test_a_suite_point_takes_one_pass_over_a_workload_with_an_end(tmp_path):
    assert WorkloadSpec(kind="needle", tasks=("passkey", "vartrack"), depths=(0.2, 0.8)).distinct_prompts == 4
    assert WorkloadSpec(kind="multi-turn", conversations=2, turns=3).distinct_prompts == 6
    assert WorkloadSpec(kind=str(conversations(tmp_path, ["a", "b", "c"]))).distinct_prompts == 3
    assert WorkloadSpec(kind="sharegpt-lengths", samples=5).distinct_prompts == 5  # no end: `samples`
