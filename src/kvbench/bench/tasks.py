"""Synthetic long-context retrieval tasks (RULER-style), generated offline with a fixed seed.

- passkey: one number hidden in filler text; asked back.
- multikey: several "magic number for <word>" needles; one of them asked back.
- vartrack: a chain of variable assignments scattered through the text; asked which variables
  hold the value.
The filler is Python's bundled documentation (`workloads.corpus_text`). Scoring is exact match:
every expected answer string must appear in the generated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvbench.bench.corpus import corpus_text
from kvbench.errors import KvbenchError

if TYPE_CHECKING:  # the load client builds prompts from these modules without torch
    from kvbench.models import LoadedModel

TASKS = ("passkey", "multikey", "vartrack")
_WORDS = ("apple", "river", "candle", "falcon", "marble", "violet", "harbor", "pepper", "canyon", "lantern")
_NAMES = ("XKQ", "BZT", "MRL", "QWE", "PLO", "DFG", "HJK", "NVC")


@dataclass(frozen=True)
class TaskInstance:
    task: str
    depth: float  # where the (first) needle sits, 0 = start of the context, 1 = end
    prompt: list[int]
    answers: tuple[str, ...]


def make_instance(lm: LoadedModel, task: str, context_tokens: int, depth: float, seed: int = 0) -> TaskInstance:
    """A task prompt of about `context_tokens` tokens (chat template included) with needles at `depth`."""
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
    overhead = len(lm.encode(" ".join(needles) + "\n\n" + question))
    filler_tokens = context_tokens - overhead
    if filler_tokens < 16:
        raise KvbenchError(f"context_tokens={context_tokens} is too short for the {task} task; use at least {overhead + 16}")
    filler = lm.encode(corpus_text()[: filler_tokens * 8], chat=False)[:filler_tokens]
    pieces, cursor = [], 0
    for needle, d in sorted(zip(needles, depths), key=lambda x: x[1]):
        cut = int(d * len(filler))
        pieces += [lm.decode(filler[cursor:cut]), needle]
        cursor = cut
    pieces.append(lm.decode(filler[cursor:]))
    text = " ".join(p.strip() for p in pieces if p.strip())
    return TaskInstance(task, depth, lm.encode(f"{text}\n\n{question}"), tuple(answers))


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
