"""`build_requests`: a workload spec to the requests a run kind sends, in the form it asks for."""

from __future__ import annotations

from kvbench.errors import KvbenchError
from kvbench.workloads import (conversations, multi_turn, needle, prefix_repetition, reuse, sharegpt, synthetic,
                               text)
from kvbench.workloads.request import FORMS, Request, complete
from kvbench.workloads.spec import WorkloadSpec
from kvbench.workloads.tokenizer import Tokenizer

_FAMILIES = {
    "synthetic": synthetic.build,
    "text": text.build,
    "needle": needle.build,
    "prefix-repetition": prefix_repetition.build,
    "multi-turn": multi_turn.build,
    "sharegpt-lengths": sharegpt.build,
    "reuse": reuse.build,
    "jsonl": conversations.build,
}


def build_requests(spec: WorkloadSpec, count: int, tokenizer: Tokenizer | None, *, form: str) -> list[Request]:
    """`count` requests of `spec`, each with `form` filled in: "ids" (in-process kinds) or "text" (a server).
    A workload with a natural length cycles through it (later cycles share prefixes)."""
    if form not in FORMS:
        raise KvbenchError(f"unknown request form {form!r}; valid: {', '.join(FORMS)}")
    if tokenizer is None and (spec.needs_tokenizer or form == "ids"):
        raise KvbenchError(f"the {spec.kind} workload needs a tokenizer (--tokenizer)")
    requests = _FAMILIES[spec.family](spec, tokenizer, count)
    if form == "text" and spec.family == "synthetic":
        requests = [synthetic.as_text(r, tokenizer) for r in requests]
    return [complete(r, tokenizer, form) for r in requests]
