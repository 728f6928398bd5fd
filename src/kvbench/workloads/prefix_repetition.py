"""`prefix-repetition`: N shared prefixes x M distinct suffixes (corpus slices), sent prefix by prefix, to
measure a prefix cache. Request ids are prefix + "\\n\\n" + suffix, so every request of a prefix begins
with the same `prefix_tokens` ids; each after the first of its prefix is marked `shared_prefix`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbench.errors import KvbenchError
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.request import Request
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec


def build(spec: WorkloadSpec, tok: Tokenizer, count: int) -> list[Request]:
    """`count` requests; past N x M the prefixes come round again (then every request shares one)."""
    if spec.prompt_tokens is None:
        raise KvbenchError("the prefix-repetition workload needs prompt_tokens (the suffix length)")
    corpus = Corpus(tok)
    prefixes = [corpus.window(spec.prefix_tokens, offset=spec.seed + p) for p in range(spec.prefixes)]
    separator = corpus.encode("\n\n")
    requests = []
    for i in range(count):
        p = (i // spec.suffixes) % spec.prefixes
        suffix = corpus.window(spec.prompt_tokens, offset=spec.seed + spec.prefixes + i)
        requests.append(Request(i, None, spec.output_tokens, ids=prefixes[p] + separator + suffix, prefix_id=p,
                                shared_prefix=i >= spec.prefixes * spec.suffixes or i % spec.suffixes > 0))
    return requests
