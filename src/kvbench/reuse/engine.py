"""Generation with cross-request KV reuse: the calls a user makes.

    engine = ReusingEngine(lm, ReuseConfig(mode="prefix"))
    engine.warm(system_prompt)              # prefill once, store its blocks
    result = engine.generate(prompt_ids)    # prefill only what the store lacks
    engine.cache_stats()                    # hits, approximate hits, misses, bytes per tier
    engine.verify_correctness(prompt_ids)   # reuse against no reuse, token for token
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.generate import GenerationConfig, GenerationResult, generate
from kvbench.models import LoadedModel
from kvbench.reuse.cache import RequestReuse, ReuseCache, ReuseConfig
from kvbench.strategies import build_strategy


@dataclass(frozen=True)
class Verification:
    identical: bool
    first_divergence: int | None  # index of the first differing generated token
    reference: list[int]
    reused: list[int]
    reuse: RequestReuse


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

    def verify_correctness(self, prompt: str | list[int], max_new_tokens: int = 32) -> Verification:
        """Greedy output with reuse (warming the prompt first if nothing of it is cached) against
        the same prompt without reuse."""
        ids = self._ids(prompt)
        config = GenerationConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
        reference = generate(self.lm, self.strategy, [ids], config).tokens[0]
        result = self.generate(ids, config)
        if result.reuse.cached_tokens == 0:
            result = self.generate(ids, config)
        reused = result.tokens[0]
        diverge = next((i for i, (a, b) in enumerate(zip(reference, reused)) if a != b), None)
        return Verification(diverge is None, diverge, reference, reused, result.reuse)
