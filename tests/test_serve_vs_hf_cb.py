"""benchmarks/serve_vs_hf_cb.py: both engines get the same requests, run them to the requested length, and
the agreement it reports is computed right."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_vs_hf_cb.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_vs_hf_cb", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_first_divergence(bench):
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_divergence([4, 2], [1, 2]) == 0
    assert bench.first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early


def test_prompts_are_seeded_and_distinct(bench):
    shape = bench.Shape(requests=3, prompt_tokens=40)
    prompts = bench.build_prompts(1000, shape)
    assert prompts == bench.build_prompts(1000, shape)
    assert [len(p) for p in prompts] == [40, 40, 40]
    assert len({tuple(p) for p in prompts}) == 3


def test_pool_and_budget_are_the_same_in_both_engines(bench):
    shape = bench.Shape()
    ours, theirs = bench.engine_config(shape), bench.hf_config(shape)
    assert (theirs.page_size, theirs.num_blocks, theirs.max_batch_tokens, theirs.max_requests_per_batch) == (
        ours.block_size, ours.num_blocks, ours.max_num_batched_tokens, ours.max_num_seqs)
    assert ours.num_blocks == 17 * 40  # 16 running requests of 640 tokens in 16-token blocks, plus one spare


def test_both_engines_serve_the_same_requests_to_the_same_tokens(bench, tiny):
    """On the tiny model both run every request to its length (prompts chunked: 32 tokens per forward),
    greedy tokens agree, each engine's clock runs forward from submission, and transformers' manager
    leaves the model's attention implementation as it found it."""
    shape = bench.Shape(requests=3, prompt_tokens=40, output_tokens=6, max_num_seqs=3, max_num_batched_tokens=32)
    prompts = bench.build_prompts(tiny.config.vocab_size, shape)
    resolved = {}
    ours = bench.run_kvbench(tiny, prompts, shape)
    theirs = bench.run_hf(tiny, prompts, shape, resolved)
    assert tiny.config._attn_implementation == "sdpa"
    assert (resolved["num_blocks"], resolved["max_batch_tokens"]) == (shape.num_blocks, 32)
    for run in (ours, theirs):
        assert [len(o) for o in run.outputs] == [6, 6, 6]
        assert all(run.submitted_s < f <= last for f, last in zip(run.first_token_s, run.last_token_s))
        assert run.summary()["output_tokens"] == 18
    assert bench.agreement(ours, theirs) == {"requests_equal": 3, "requests": 3, "first_divergence": [None] * 3}
