"""`multi-turn`: C conversations of T turns, sent round by round. Turn k carries the whole history
(earlier user turns and fixed assistant replies, corpus text), so its messages extend turn k-1's; in
ids, a chat template that only appends keeps that prefix too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbench.errors import KvbenchError
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.request import Request, user
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec


def build(spec: WorkloadSpec, tok: Tokenizer, count: int) -> list[Request]:
    if spec.prompt_tokens is None:
        raise KvbenchError("the multi-turn workload needs prompt_tokens (the length of a user turn)")
    corpus = Corpus(tok)

    def text(n: int, offset: int) -> str:
        return tok.decode(corpus.window(n, offset=spec.seed + offset))

    requests = []
    for i in range(count):
        turn, conv = divmod(i % (spec.conversations * spec.turns), spec.conversations)
        history: list[dict] = []
        for k in range(turn):  # earlier turns with fixed replies, so turn k's prompt extends turn k-1's
            history += [user(text(spec.prompt_tokens, 2 * (conv * spec.turns + k))),
                        {"role": "assistant", "content": text(spec.output_tokens, 2 * (conv * spec.turns + k) + 1)}]
        history.append(user(text(spec.prompt_tokens, 2 * (conv * spec.turns + turn))))
        requests.append(Request(i, tuple(history), spec.output_tokens, prefix_id=conv,
                                shared_prefix=turn > 0 or i >= spec.conversations * spec.turns, turn=turn))
    return requests
