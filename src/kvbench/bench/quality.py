"""Output quality of a strategy, always against the full `dynamic` cache on the same prompt.

- greedy agreement: share of identical greedy tokens, and where the first divergence is;
- teacher-forced: per-position top-1 agreement and KL(reference || strategy) of next-token
  distributions over the same continuation;
- perplexity of a text continuation given a (compressed) context.
Pure functions over tokens and log-probabilities; `kvbench.engine.teacher` produces the latter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a function needs it: reports use greedy_agreement without it
    import torch


@dataclass(frozen=True)
class GreedyAgreement:
    fraction: float  # identical positions / reference length
    first_divergence: int | None  # index of the first differing token, None when identical


def greedy_agreement(reference: list[int], candidate: list[int]) -> GreedyAgreement:
    """Position-by-position comparison; a candidate that stops early mismatches every missing position."""
    if not reference:
        raise ValueError("an empty reference has no agreement")
    same = [i < len(candidate) and candidate[i] == t for i, t in enumerate(reference)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    if first is None and len(candidate) > len(reference):
        first = len(reference)
    return GreedyAgreement(sum(same) / len(reference), first)


@dataclass(frozen=True)
class DistributionAgreement:
    top1_agreement: float
    kl_mean: float  # nats, mean over positions of KL(reference || candidate)


def distribution_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> DistributionAgreement:
    """Both [positions, vocab] log-probabilities over the same continuation."""
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(f"need two equal [positions, vocab] tensors, got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    kl = (reference.exp() * (reference - candidate)).sum(-1).clamp(min=0).mean().item()
    return DistributionAgreement(top1, kl)


def perplexity(logprobs: torch.Tensor, targets: list[int]) -> float:
    """exp of the mean negative log-likelihood of `targets` under [len(targets), vocab] log-probabilities."""
    import torch

    if logprobs.shape[0] != len(targets) or not targets:
        raise ValueError("need one row of log-probabilities per target token")
    nll = -logprobs[torch.arange(len(targets)), torch.tensor(targets)].mean().item()
    return math.exp(nll)
