"""Quality of one strategy's generations, measured against the full `dynamic` cache on the same prompt.

Untimed: the reference runs and teacher-forced passes happen outside the measured trials. The
reference for a prompt is computed once and shared by every strategy of the sweep.
"""

from __future__ import annotations

from kvbench.bench.quality import distribution_agreement, greedy_agreement, perplexity
from kvbench.engine import GenerationConfig, generate
from kvbench.engine.teacher import teacher_forced_logprobs
from kvbench.models import LoadedModel
from kvbench.strategies import build_strategy
from kvbench.strategies.base import CacheStrategy
from kvbench.workloads import Request


class Assessor:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.reference = build_strategy("dynamic")
        self._greedy: dict[tuple, list[int]] = {}
        self._logprobs: dict[tuple, object] = {}
        self._distribution: dict[tuple, dict] = {}

    def reference_tokens(self, prompt: Request, config: GenerationConfig) -> list[int]:
        key = (tuple(prompt.ids), config)
        if key not in self._greedy:
            self._greedy[key] = generate(self.lm, self.reference, [prompt.ids], config).tokens[0]
        return self._greedy[key]

    def greedy(self, prompt: Request, config: GenerationConfig, tokens: list[int]) -> dict:
        agreement = greedy_agreement(self.reference_tokens(prompt, config), tokens)
        return {"greedy_agreement": agreement.fraction, "first_divergence": agreement.first_divergence}

    def distribution(self, label: str, strategy: CacheStrategy, prompt: Request, config: GenerationConfig) -> dict:
        """Teacher-forced top-1 agreement and KL against dynamic; perplexity where the true text is known.

        The continuation is the text's true next tokens when the workload has them, else the
        reference's greedy output. Computed once per (strategy, prompt).
        """
        key = (label, tuple(prompt.ids), config)
        if key not in self._distribution:
            continuation = list(prompt.continuation) or self.reference_tokens(prompt, config)
            reference = self._reference_logprobs(prompt, continuation)
            candidate = teacher_forced_logprobs(self.lm, strategy, prompt.ids, continuation)
            agreement = distribution_agreement(reference, candidate)
            fields = {"top1_agreement": agreement.top1_agreement, "kl_mean": agreement.kl_mean}
            if prompt.continuation:
                fields["perplexity"] = perplexity(candidate, continuation)
                fields["reference_perplexity"] = perplexity(reference, continuation)
            self._distribution[key] = fields
        return self._distribution[key]

    def _reference_logprobs(self, prompt: Request, continuation: list[int]):
        key = (tuple(prompt.ids), tuple(continuation))
        if key not in self._logprobs:
            self._logprobs[key] = teacher_forced_logprobs(self.lm, self.reference, prompt.ids, continuation)
        return self._logprobs[key]
