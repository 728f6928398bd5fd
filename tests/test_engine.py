import pytest
import torch

from kvbench.engine import GenerationConfig, SamplingConfig, generate
from kvbench.engine.generate import left_pad
from kvbench.errors import KvbenchError
from kvbench.strategies import build_strategy


def test_batch_with_left_padding_matches_single_prompts(tiny):
    prompts = [list(range(30, 60)), list(range(200, 207)), list(range(300, 318))]
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    batched = generate(tiny, build_strategy("dynamic"), prompts, config).tokens
    singles = [generate(tiny, build_strategy("dynamic"), [p], config).tokens[0] for p in prompts]
    assert batched == singles


def test_left_pad_layout():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_step_times_are_monotonic_one_per_token(tiny):
    result = generate(tiny, build_strategy("dynamic"), [[9] * 12], GenerationConfig(max_new_tokens=6, stop_at_eos=False))
    assert len(result.step_times_s) == 6 == result.output_tokens
    assert all(b > a for a, b in zip(result.step_times_s, result.step_times_s[1:]))
    assert set(result.peak_mem_bytes) == {"prefill", "decode"}


def test_stops_at_eos(tiny, monkeypatch):
    prompt = [list(range(40, 60))]
    free = generate(tiny, build_strategy("dynamic"), prompt, GenerationConfig(max_new_tokens=6, stop_at_eos=False))
    third = free.tokens[0][2]
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", third)
    stopped = generate(tiny, build_strategy("dynamic"), prompt, GenerationConfig(max_new_tokens=6))
    first_eos = free.tokens[0].index(third)
    assert stopped.tokens[0] == free.tokens[0][: first_eos + 1]


def test_rows_that_stop_early_are_trimmed_while_others_continue(tiny, monkeypatch):
    prompts = [list(range(40, 60)), list(range(70, 90))]
    config = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    free = generate(tiny, build_strategy("dynamic"), prompts, config).tokens
    eos = free[0][0]
    if eos in free[1]:
        pytest.skip("both rows produce the chosen token")
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", eos)
    stopped = generate(tiny, build_strategy("dynamic"), prompts, GenerationConfig(max_new_tokens=6)).tokens
    assert stopped == [[eos], free[1]]


def test_seeded_sampling_is_reproducible(tiny):
    prompt = [list(range(10, 30))]

    def run(seed):
        sampling = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=seed)
        return generate(tiny, build_strategy("dynamic"), prompt,
                        GenerationConfig(max_new_tokens=16, sampling=sampling, stop_at_eos=False)).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_max_new_tokens_must_be_positive():
    with pytest.raises(KvbenchError, match="max_new_tokens must be > 0"):
        GenerationConfig(max_new_tokens=0)


def test_prompt_over_context_window_is_refused(tiny):
    too_long = [[5] * tiny.context_window]
    with pytest.raises(KvbenchError, match="exceeds the context window"):
        generate(tiny, build_strategy("dynamic"), too_long, GenerationConfig(max_new_tokens=1))


def test_token_ids_outside_vocab_are_refused(tiny):
    with pytest.raises(KvbenchError, match="token ids must be in"):
        generate(tiny, build_strategy("dynamic"), [[tiny.config.vocab_size]], GenerationConfig(max_new_tokens=1))


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}])
def test_bad_sampling_values(kwargs):
    with pytest.raises(KvbenchError):
        SamplingConfig(**kwargs)



def test_the_model_runner_passes_the_cache_by_a_keyword_that_does_not_warn(tiny):
    import inspect
    import warnings

    from transformers import DynamicCache

    from kvbench.engine.model_runner import cache_keyword, forward

    assert cache_keyword(type(tiny.model)) in inspect.signature(type(tiny.model).forward).parameters
    cache = DynamicCache(config=tiny.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecations warn with FutureWarning
        logits = forward(tiny.model, torch.tensor([[5, 6, 7]]), cache=cache)
    assert logits.shape[:2] == (1, 1) and cache.get_seq_length() == 3


def test_engine_does_not_import_reuse():
    """Data flows one way: reuse provides prefill through the engine's PrefillSource, never the reverse."""
    import subprocess
    import sys

    code = ("import sys, kvbench.engine, kvbench.engine.prefill; "
            "print([m for m in sys.modules if m.startswith('kvbench.reuse') or m.startswith('kvbench.bench')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
