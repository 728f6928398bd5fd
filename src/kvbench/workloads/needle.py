"""`needle`: synthetic long-context retrieval tasks (RULER-style), generated offline with a fixed seed.

- passkey: one number hidden in filler text; asked back.
- multikey: several "magic number for <word>" needles; one of them asked back.
- vartrack: a chain of variable assignments scattered through the text; asked which variables
  hold the value.
The filler is the corpus. A task is one user message; `prompt_tokens` counts its ids with the chat
template. Scoring is exact match (`Request.score`): every expected answer must appear in the output.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.request import Request, ids_of, user
from kvbench.workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvbench.workloads.spec import WorkloadSpec

TASKS = ("passkey", "multikey", "vartrack")
_WORDS = ("apple", "river", "candle", "falcon", "marble", "violet", "harbor", "pepper", "canyon", "lantern")
_NAMES = ("XKQ", "BZT", "MRL", "QWE", "PLO", "DFG", "HJK", "NVC")


def build(spec: WorkloadSpec, tok: Tokenizer, count: int) -> list[Request]:
    """One request per task x depth, cycled to `count`."""
    if spec.prompt_tokens is None:
        raise KvbenchError("a needle workload needs prompt_tokens (the context lengths)")
    tasks = [make_instance(tok, t, spec.prompt_tokens, d, spec.seed, spec.output_tokens)
             for t in spec.tasks for d in spec.depths]
    return [replace(tasks[i % len(tasks)], index=i) for i in range(count)]


def make_instance(tok: Tokenizer, task: str, context_tokens: int, depth: float, seed: int = 0,
                  max_tokens: int = 24) -> Request:
    """A task of about `context_tokens` tokens (chat template included) with needles at `depth`."""
    if task not in TASKS:
        raise KvbenchError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if not 0 <= depth <= 1:
        raise KvbenchError(f"needle depth must be in [0, 1], got {depth}")
    rng = np.random.default_rng([seed, context_tokens, int(depth * 1000), TASKS.index(task)])
    needles, question, answers = _needles(task, rng)
    if task == "multikey":  # the asked needle sits at `depth`, the distractors anywhere
        depths = [depth] + rng.uniform(0, 1, len(needles) - 1).tolist()
    else:  # a chain starts at `depth` and spreads over the following 30% of the context
        depths = np.linspace(depth, min(1.0, depth + 0.3), len(needles)).tolist()
    overhead = len(ids_of((user(" ".join(needles) + "\n\n" + question),), tok))
    filler_tokens = context_tokens - overhead
    if filler_tokens < 16:
        raise KvbenchError(f"context_tokens={context_tokens} is too short for the {task} task; use at least {overhead + 16}")
    filler = Corpus(tok).window(filler_tokens)
    pieces, cursor = [], 0
    for needle, d in sorted(zip(needles, depths), key=lambda x: x[1]):
        cut = int(d * len(filler))
        pieces += [tok.decode(filler[cursor:cut], skip_special_tokens=True), needle]
        cursor = cut
    pieces.append(tok.decode(filler[cursor:], skip_special_tokens=True))
    text = " ".join(p.strip() for p in pieces if p.strip())
    return Request(0, (user(f"{text}\n\n{question}"),), max_tokens, task=task, depth=depth, answers=tuple(answers))


def _needles(task: str, rng: np.random.Generator) -> tuple[list[str], str, list[str]]:
    if task == "passkey":
        key = str(rng.integers(10000, 99999))
        return ([f"The pass key is {key}. Remember it. {key} is the pass key."],
                "What is the pass key? Answer with the number only.", [key])
    if task == "multikey":
        words = rng.choice(_WORDS, size=4, replace=False).tolist()
        numbers = [str(n) for n in rng.integers(100000, 999999, size=4)]
        needles = [f"The special magic number for {w} is {n}." for w, n in zip(words, numbers)]
        return needles, f"What is the special magic number for {words[0]}? Answer with the number only.", [numbers[0]]
    names = rng.choice(_NAMES, size=3, replace=False).tolist()
    value = str(rng.integers(10000, 99999))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return needles, f"Which variables are assigned the value {value}? List their names only.", names
