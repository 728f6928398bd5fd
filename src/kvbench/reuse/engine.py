"""Generation with cross-request KV reuse: the calls a user makes.

    engine = ReusingEngine(lm, ReuseConfig(mode="prefix"))
    engine.warm(system_prompt)              # prefill once, store its blocks
    result = engine.generate(prompt_ids)    # prefill only what the store lacks
    engine.cache_stats()                    # hits, approximate hits, misses, bytes per tier
    engine.verify_correctness(prompt_ids)   # reuse against no reuse: token for token, teacher-forced, the bar
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvbench.bench.quality import distribution_agreement
from kvbench.engine.generate import GenerationConfig, GenerationResult, generate
from kvbench.engine.teacher import teacher_forced_logprobs
from kvbench.models import LoadedModel
from kvbench.reuse.bar import BAR, QualityBar
from kvbench.reuse.cache import RequestReuse, ReuseCache, ReuseConfig
from kvbench.reuse.plan import plan
from kvbench.strategies import build_strategy
from kvbench.workloads import for_model

log = logging.getLogger("kvbench.reuse")


@dataclass(frozen=True)
class Verification:
    identical: bool
    first_divergence: int | None  # index of the first differing generated token
    reference: list[int]
    reused: list[int]
    reuse: RequestReuse
    top1_agreement: float  # teacher-forced over the reference's greedy output
    kl_mean: float  # nats, mean over its positions of KL(no reuse || reuse)
    accuracy: float | None  # every expected answer in the reused output (None: no answers given)
    reference_accuracy: float | None
    shortfalls: tuple[str, ...]  # what falls below the quality bar (empty: it meets it)


class ReusingEngine:
    def __init__(self, lm: LoadedModel, config: ReuseConfig = ReuseConfig()):
        self.lm = lm
        self.cache = ReuseCache(lm, config)
        self.strategy = build_strategy("dynamic")

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return self.lm.encode(prompt, chat=False) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompt: str | list[int], config: GenerationConfig = GenerationConfig()) -> GenerationResult:
        return generate(self.lm, self.strategy, [self._ids(prompt)], config, reuse=self.cache)

    def warm(self, text: str | list[int]) -> RequestReuse:
        """Prefill `text` (raw tokens, no chat template) and store its blocks, generating nothing more."""
        return self.generate(text, GenerationConfig(max_new_tokens=1, stop_at_eos=False)).reuse

    def cache_stats(self) -> dict:
        return self.cache.stats()

    def verify_correctness(self, prompt: str | list[int], max_new_tokens: int = 32, answers: tuple[str, ...] = (),
                           bar: QualityBar = BAR) -> Verification:
        """Greedy output with reuse (warming the prompt first if nothing of it is cached) against the same prompt
        without reuse, teacher-forced top-1 and KL over the reference's output, and exact-match accuracy when
        `answers` are given. Logs a warning when the result falls below `bar`."""
        ids = self._ids(prompt)
        config = GenerationConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
        reference = generate(self.lm, self.strategy, [ids], config).tokens[0]
        if not plan(ids, self.cache.store, self.cache.ns, chunk=self.cache.config.mode == "chunk"):
            self.warm(ids)
        # the teacher-forced pass first: afterwards the store holds this prompt's own blocks (exact hits)
        candidate = teacher_forced_logprobs(self.lm, self.strategy, ids, reference, self.cache)
        result = self.generate(ids, config)
        agreement = distribution_agreement(teacher_forced_logprobs(self.lm, self.strategy, ids, reference), candidate)
        reused = result.tokens[0]
        diverge = next((i for i, (a, b) in enumerate(zip(reference, reused)) if a != b), None)

        def score(tokens):
            return float(all(a in for_model(self.lm).decode(tokens, skip_special_tokens=True) for a in answers)) if answers else None

        accuracy, reference_accuracy = score(reused), score(reference)
        shortfalls = bar.shortfalls(agreement.top1_agreement, accuracy, reference_accuracy)
        if shortfalls:
            log.warning("kvbench reuse: %s reuse of this prompt is below the quality bar: %s",
                        self.cache.config.mode, "; ".join(shortfalls))
        return Verification(diverge is None, diverge, reference, reused, result.reuse, agreement.top1_agreement,
                            agreement.kl_mean, accuracy, reference_accuracy, shortfalls)
