import math

import pytest
import torch

from kvbench.bench.quality import GreedyAgreement, distribution_agreement, greedy_agreement, perplexity
from kvbench.engine import GenerationConfig, generate
from kvbench.engine.teacher import teacher_forced_logprobs
from kvbench.strategies import build_strategy


def test_greedy_agreement_counts_positions_and_first_divergence():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == GreedyAgreement(1.0, None)
    a = greedy_agreement([1, 2, 3, 4], [1, 9, 3, 4])
    assert (a.fraction, a.first_divergence) == (0.75, 1)
    short = greedy_agreement([1, 2, 3, 4], [1, 2])  # stopped early: the missing positions disagree
    assert (short.fraction, short.first_divergence) == (0.5, 2)
    with pytest.raises(ValueError):
        greedy_agreement([], [1])


def test_distribution_agreement_on_hand_made_distributions():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]).log()
    q = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]).log()
    d = distribution_agreement(p, q)
    assert d.top1_agreement == 0.5
    expected = sum((p.exp() * (p - q)).sum(-1).tolist()) / 2
    assert d.kl_mean == pytest.approx(expected)
    assert distribution_agreement(p, p).kl_mean == pytest.approx(0.0, abs=1e-7)


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    logprobs = torch.full((5, 8), -math.log(8))
    assert perplexity(logprobs, [0, 1, 2, 3, 4]) == pytest.approx(8.0)


def test_teacher_forcing_matches_the_model_on_the_whole_sequence(tiny):
    prompt, continuation = list(range(30, 50)), [60, 61, 62, 63, 64]
    logprobs = teacher_forced_logprobs(tiny, build_strategy("dynamic"), prompt, continuation)
    full = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        reference = tiny.model(full).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    assert logprobs.shape == (5, tiny.config.vocab_size)
    assert torch.allclose(logprobs, reference, atol=1e-4)


def test_teacher_forcing_agrees_across_lossless_strategies(tiny):
    prompt, continuation = list(range(30, 70)), list(range(100, 108))
    ref = teacher_forced_logprobs(tiny, build_strategy("dynamic"), prompt, continuation)
    for name in ("no_cache", "static", "offloaded"):
        other = teacher_forced_logprobs(tiny, build_strategy(name), prompt, continuation)
        assert torch.allclose(ref, other, atol=1e-4), name


def test_greedy_argmax_of_teacher_forcing_reproduces_generation(tiny):
    prompt = list(range(30, 70))
    tokens = generate(tiny, build_strategy("h2o", budget=24, window=4), [prompt],
                      GenerationConfig(max_new_tokens=8, stop_at_eos=False)).tokens[0]
    logprobs = teacher_forced_logprobs(tiny, build_strategy("h2o", budget=24, window=4), prompt, tokens)
    assert logprobs.argmax(-1).tolist() == tokens
