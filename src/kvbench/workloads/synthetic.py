"""`synthetic` (alias `random`): seeded random token ids of an exact length. No tokenizer in the timed
path and any model takes them, random-initialised ones included. With `max_prompt_tokens` /
`max_output_tokens`, each request draws its prompt / output length uniformly from the closed range
(seeded by (seed, request), so a longer run begins with a shorter one's requests)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.workloads.request import Request, user
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec


def synthetic_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """Seeded uniform token ids, avoiding the low ids where special tokens (BOS/EOS/PAD) live."""
    low = min(16, vocab_size // 2)
    rng = np.random.default_rng([seed, length])
    return rng.integers(low, vocab_size, size=length).tolist()


def build(spec: WorkloadSpec, tok: Tokenizer, count: int) -> list[Request]:
    if spec.prompt_tokens is None:
        raise KvbenchError(f"the {spec.kind} workload needs prompt_tokens (a suite's list of lengths, or "
                           "--prompt-tokens)")
    requests = []
    for i in range(count):
        prompt_tokens, output_tokens = _lengths(spec, i)
        requests.append(Request(i, None, output_tokens, ids=synthetic_ids(tok.vocab_size, prompt_tokens, spec.seed + i)))
    return requests


def _lengths(spec: WorkloadSpec, i: int) -> tuple[int, int]:
    """Request i's (prompt, output) lengths: fixed, or uniform over [low, max] where a max is set."""
    rng = np.random.default_rng([spec.seed, 0x554E, i])
    prompt = spec.prompt_tokens if spec.max_prompt_tokens is None else \
        int(rng.integers(spec.prompt_tokens, spec.max_prompt_tokens + 1))
    output = spec.output_tokens if spec.max_output_tokens is None else \
        int(rng.integers(spec.output_tokens, spec.max_output_tokens + 1))
    return prompt, output


def as_text(request: Request, tok: Tokenizer) -> Request:
    """Random ids are no tokenization of any text: their decoded text re-tokenizes longer. Decode,
    re-encode, cut to the same count and decode again: text a server counts as about that many tokens."""
    n = len(request.ids)
    text = tok.decode(tok.encode(tok.decode(request.ids), add_special_tokens=False)[:n])
    return replace(request, messages=(user(text),))
