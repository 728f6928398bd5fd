"""Integration tests on the embedded SmolLM2-135M-Instruct (real weights, real tokenizer)."""

import pytest

from kvbench.workloads import DEFAULT_PROMPTS
from kvbench.cli import main
from kvbench.engine import GenerationConfig, generate
from kvbench.strategies import build_strategy

pytestmark = pytest.mark.slow


def test_embedded_model_answers_sensibly(embedded):
    result = generate(embedded, build_strategy("dynamic"), [embedded.encode("What is the capital of France?")],
                      GenerationConfig(max_new_tokens=12))
    assert "Paris" in embedded.decode(result.tokens[0])


def test_all_cache_modes_give_identical_greedy_output(embedded):
    prompts = [embedded.encode(p) for p in DEFAULT_PROMPTS[:2]]
    config = GenerationConfig(max_new_tokens=32, stop_at_eos=False)
    outputs = {name: generate(embedded, build_strategy(name), prompts, config).tokens
               for name in ("no_cache", "dynamic", "static", "offloaded")}
    for name, tokens in outputs.items():
        assert tokens == outputs["dynamic"], name


def test_embedded_kv_bytes_match_the_formula(embedded):
    cfg = embedded.config
    prompt = embedded.encode("Tell me about caches.")
    result = generate(embedded, build_strategy("dynamic"), [prompt], GenerationConfig(max_new_tokens=4, stop_at_eos=False))
    tokens = len(prompt) + 4 - 1
    assert result.kv_cache_bytes == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * tokens * 4


def test_quick_suite_on_embedded_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["run", "cache-vs-nocache", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "best end-to-end speedup" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "dynamic/ptext/o24/b1" in report and "no_cache/ptext/o24/b1" in report


@pytest.mark.parametrize("name", ["sink", "h2o", "snapkv"])
def test_full_budget_equals_dynamic_on_the_embedded_model(embedded, name):
    prompt = [embedded.encode(DEFAULT_PROMPTS[1])]
    config = GenerationConfig(max_new_tokens=32, stop_at_eos=False)
    reference = generate(embedded, build_strategy("dynamic"), prompt, config).tokens
    assert generate(embedded, build_strategy(name, budget=1.0), prompt, config).tokens == reference


def test_int8_keeps_greedy_output(embedded):
    from kvbench.workloads.corpus import corpus_text
    from kvbench.bench.quality import greedy_agreement

    text = corpus_text()[20000:24000]
    prompt = [embedded.encode(f"Summarise this documentation:\n\n{text}")[:700]]
    config = GenerationConfig(max_new_tokens=64, stop_at_eos=False)
    reference = generate(embedded, build_strategy("dynamic"), prompt, config)
    int8 = generate(embedded, build_strategy("quantized", bits=8), prompt, config)
    assert greedy_agreement(reference.tokens[0], int8.tokens[0]).fraction >= 0.95
    assert int8.kv_cache_bytes < 0.45 * reference.kv_cache_bytes  # sinks + residual window stay float32


def test_compression_and_needle_suites_run_quick(tmp_path, capsys):
    import json

    for suite in ("compression-sweep", "needle"):
        out = tmp_path / suite
        assert main(["run", suite, "--quick", "--out", str(out), "--no-progress"]) == 0
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert records and all(not r["warmup"] for r in records)
        if suite == "compression-sweep":
            assert {"greedy_agreement", "kl_mean", "top1_agreement", "perplexity"} <= set(records[0])
            assert {r["budget"] for r in records} == {None, 0.5, 0.25}
            assert {r["bits"] for r in records} == {None, 8, 4}
        else:
            assert {r["task"] for r in records} == {"passkey"} and {r["depth"] for r in records} == {0.2, 0.8}
            assert all(r["accuracy"] in (0.0, 1.0) for r in records)
            assert (out / "figures" / "needle.png").exists()
