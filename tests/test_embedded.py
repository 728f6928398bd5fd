"""Integration tests on the embedded SmolLM2-135M-Instruct (real weights, real tokenizer)."""

import pytest

from kvbench.bench.workloads import DEFAULT_PROMPTS
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
