"""The reference modes: no cache (full recompute), a growing dynamic cache, a preallocated static cache."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DynamicCache, StaticCache

from kvbench.strategies import register
from kvbench.strategies.base import Capabilities, CacheStrategy


@register
@dataclass
class NoCache(CacheStrategy):
    name = "no_cache"
    summary = "no KV cache: every step recomputes attention over the whole sequence (use_cache=False)"
    capabilities = Capabilities(uses_cache=False)

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        return None


@register
@dataclass
class Dynamic(CacheStrategy):
    name = "dynamic"
    summary = "transformers DynamicCache: grows by concatenation every step"

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        return DynamicCache(config=lm.config)


@register
@dataclass
class Static(CacheStrategy):
    name = "static"
    summary = "transformers StaticCache preallocated to prompt + max_new_tokens, updated in place"

    def make_cache(self, lm, batch_size, prompt_tokens, max_new_tokens):
        return StaticCache(config=lm.config, max_cache_len=prompt_tokens + max_new_tokens)
