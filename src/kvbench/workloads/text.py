"""`text`: real text. Without `prompt_tokens`, the given prompts as written (a chat message each);
with it, corpus slices of exactly that many tokens, each keeping its true next `output_tokens` tokens
for perplexity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbench.workloads.corpus import Corpus
from kvbench.workloads.request import Request, user
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec


def build(spec: WorkloadSpec, tok: Tokenizer, count: int) -> list[Request]:
    if spec.prompt_tokens is None:
        return [Request(i, (user(spec.prompts[i % len(spec.prompts)]),), spec.output_tokens) for i in range(count)]
    corpus = Corpus(tok, path=spec.corpus)
    n = spec.prompt_tokens
    slices = [corpus.window(n + spec.output_tokens, offset=spec.seed + i) for i in range(count)]
    return [Request(i, None, spec.output_tokens, ids=s[:n], continuation=tuple(s[n:])) for i, s in enumerate(slices)]
