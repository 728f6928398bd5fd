"""`synthetic` (alias `random`): seeded random token ids of an exact length. No tokenizer in the timed
path and any model takes them, random-initialised ones included."""

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
    return [Request(i, None, spec.output_tokens, ids=synthetic_ids(tok.vocab_size, spec.prompt_tokens, spec.seed + i))
            for i in range(count)]


def as_text(request: Request, tok: Tokenizer) -> Request:
    """Random ids are no tokenization of any text: their decoded text re-tokenizes longer. Decode,
    re-encode, cut to the same count and decode again: text a server counts as about that many tokens."""
    n = len(request.ids)
    text = tok.decode(tok.encode(tok.decode(request.ids), add_special_tokens=False)[:n])
    return replace(request, messages=(user(text),))
