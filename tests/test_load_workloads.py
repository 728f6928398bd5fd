import json
import math
from dataclasses import replace

import pytest

from kvbench.load.session import fit_context, rate_requests
from kvbench.load.spec import DEFAULT_REQUESTS, LoadSpec
from kvbench.load.workloads import LoadWorkload, build_requests, context_window, load_tokenizer, read_conversations
from kvbench.errors import KvbenchError


class CharTokenizer:
    """One token per character: exact round trips, so lengths can be checked."""

    vocab_size = 256

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 256 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_random_prompts_are_seeded_with_the_asked_length():
    tok = CharTokenizer()
    a = build_requests(LoadWorkload(prompt_tokens=20, output_tokens=7, seed=1), 3, tok)
    assert [len(r.prompt) for r in a] == [20, 20, 20]
    assert a[0].prompt != a[1].prompt and a[0].max_tokens == 7
    assert [r.prompt for r in a] == [r.prompt for r in build_requests(LoadWorkload(prompt_tokens=20, seed=1), 3, tok)]


def test_prefix_repetition_shares_prefixes_in_order():
    spec = LoadWorkload(kind="prefix-repetition", prefixes=2, suffixes=3, prefix_tokens=30, prompt_tokens=10)
    reqs = build_requests(spec, spec.natural_count, CharTokenizer())
    assert len(reqs) == 6
    assert [r.prefix_id for r in reqs] == [0, 0, 0, 1, 1, 1]
    assert [r.shared_prefix for r in reqs] == [False, True, True, False, True, True]
    prefix = lambda r: r.prompt[:30]  # noqa: E731
    assert prefix(reqs[0]) == prefix(reqs[2]) != prefix(reqs[3])
    assert len({r.prompt for r in reqs}) == 6  # every suffix differs


def test_multi_turn_prompts_extend_the_previous_turn():
    spec = LoadWorkload(kind="multi-turn", conversations=2, turns=3, prompt_tokens=12, output_tokens=5)
    reqs = build_requests(spec, spec.natural_count, CharTokenizer())
    assert [(r.turn, r.prefix_id) for r in reqs] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    conv0 = [r for r in reqs if r.prefix_id == 0]
    for earlier, later in zip(conv0, conv0[1:]):
        assert later.messages[:len(earlier.messages)] == earlier.messages
        assert later.messages[len(earlier.messages)]["role"] == "assistant"
    assert [r.shared_prefix for r in reqs] == [False, False, True, True, True, True]


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
    spec = LoadWorkload(kind=str(path), output_tokens=9)
    assert spec.natural_count == 2 and not spec.needs_tokenizer
    reqs = build_requests(spec, 3, None)
    assert reqs[2].messages == reqs[0].messages and reqs[0].prompt == "be brief\n\nhi"


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


def test_workload_validation():
    with pytest.raises(KvbenchError, match="unknown workload 'nope'"):
        LoadWorkload(kind="nope")
    with pytest.raises(KvbenchError, match="prefixes must be >= 1"):
        LoadWorkload(prefixes=0)
    with pytest.raises(KvbenchError, match="needs a tokenizer"):
        build_requests(LoadWorkload(), 1, None)


def test_random_prompts_with_the_embedded_tokenizer_are_near_the_target_length():
    tok = load_tokenizer("smollm2-135m")
    (req,) = build_requests(LoadWorkload(prompt_tokens=64), 1, tok)
    assert abs(len(tok.encode(req.prompt, add_special_tokens=False)) - 64) <= 8


def test_reuse_suite_sequences_as_load_workloads():
    tok = CharTokenizer()
    reqs = build_requests(LoadWorkload(kind="reuse:rag-interior-500", output_tokens=4), 3, tok)
    document = reqs[0].prompt[reqs[0].prompt.index("Document: "):][:500]
    assert all(document in r.prompt for r in reqs)
    assert len({r.prompt.split("Document: ")[0] for r in reqs}) == 3  # a different preamble each
    # the document is shared, but after a different preamble: no request shares a prefix
    assert [(r.prefix_id, r.shared_prefix) for r in reqs] == [(0, False), (1, False), (2, False)]
    assert reqs[0].max_tokens == 4
    prefixed = build_requests(LoadWorkload(kind="reuse:rag-prefix-500"), 3, tok)
    assert [(r.prefix_id, r.shared_prefix) for r in prefixed] == [(0, False), (0, True), (0, True)]
    turns = build_requests(LoadWorkload(kind="reuse:multi-turn"), 3, tok)
    assert [r.turn for r in turns] == [1, 2, 3] and turns[2].prompt.startswith(turns[1].prompt)
    with pytest.raises(KvbenchError, match="unknown reuse workload 'rag-middle-5'"):
        LoadWorkload(kind="reuse:rag-middle-5")


def test_reuse_load_counts_fit_the_context_window():
    tok = CharTokenizer()
    tok.model_max_length = 2000
    config = LoadSpec(url="http://x", workload=LoadWorkload(kind="reuse:multi-turn", output_tokens=10))
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


def test_the_embedded_tokenizer_knows_its_context_window_from_the_model_config():
    assert context_window(load_tokenizer("smollm2-135m")) == 8192
