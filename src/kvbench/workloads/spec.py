"""One workload spec for every run kind: a suite's `workload:` block, `kvbench load`'s flags and the reuse
suites' sequences (`reuse:<name>`). `kvbench.fields.checked_fields` checks a raw
block against these fields (names and types); `__post_init__` checks the values: one validation path.

A run kind that sweeps lengths (a suite's `prompt_tokens` and `output_tokens` lists) sets
`prompt_tokens` and `output_tokens` per point with `dataclasses.replace`; `kvbench load` takes them
from its flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.workloads.conversations import read_conversations
from kvbench.workloads.needle import TASKS
from kvbench.workloads.reuse import check_name

# `random` is `synthetic` under the name `kvbench load` has always used
KINDS = ("synthetic", "random", "text", "needle", "prefix-repetition", "multi-turn", "sharegpt-lengths")

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Explain what a KV cache is in a transformer, in three sentences.",
    "Write a short poem about the sea.",
    "List five uses of a hash table.",
)


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str = "synthetic"  # one of KINDS, reuse:<reuse workload>, or a path to a .jsonl file of conversations
    seed: int = 0
    # prompt (synthetic, text slice, needle context), suffix or user turn length; None: text prompts as written
    prompt_tokens: int | None = 128
    output_tokens: int = 64  # max_tokens of every request (sharegpt-lengths draws its own)
    # synthetic: when set, each request's prompt / output length is drawn uniformly from
    # [prompt_tokens, max_prompt_tokens] / [output_tokens, max_output_tokens] (seeded per request)
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    prompts: tuple[str, ...] = field(default_factory=lambda: DEFAULT_PROMPTS)  # text, without prompt_tokens
    samples: int = 1  # a suite point's distinct prompts for workloads without an end; trials cycle through them
    corpus: str | None = None  # text file for text slices; default: Python's bundled docs
    tasks: tuple[str, ...] = ("passkey",)  # needle
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # needle positions, 0 = start of the context
    prefix_tokens: int = 512  # prefix-repetition
    prefixes: int = 4  # prefix-repetition: N shared prefixes
    suffixes: int = 4  # prefix-repetition: M requests per prefix
    conversations: int = 4  # multi-turn
    turns: int = 3  # multi-turn

    def __post_init__(self):
        if self.kind.startswith("reuse:"):
            check_name(self.kind.removeprefix("reuse:"))
        elif self.kind not in KINDS and not self.kind.endswith(".jsonl"):
            raise KvbenchError(f"unknown workload {self.kind!r}; valid: {', '.join(KINDS)}, reuse:<reuse workload> "
                               "(reuse:rag-prefix-2000), or a path to a .jsonl file")
        if self.kind == "text" and not self.prompts:
            raise KvbenchError("a text workload needs at least one prompt")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise KvbenchError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise KvbenchError(f"needle depths must be in [0, 1], got {list(self.depths)}")
        for name in ("output_tokens", "samples", "prefix_tokens", "prefixes", "suffixes", "conversations", "turns"):
            if getattr(self, name) < 1:
                raise KvbenchError(f"workload {name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise KvbenchError(f"workload prompt_tokens must be >= 1, got {self.prompt_tokens}")
        for low, high in (("prompt_tokens", "max_prompt_tokens"), ("output_tokens", "max_output_tokens")):
            lo, hi = getattr(self, low), getattr(self, high)
            if hi is not None and self.family != "synthetic":
                raise KvbenchError(f"workload {high} draws lengths of synthetic workloads only, not of {self.kind!r}; "
                                   "drop it or use kind: synthetic")
            if hi is not None and (lo is None or hi < lo):
                raise KvbenchError(f"workload {high} must be >= {low} (lengths are drawn from [{low}, {high}]), "
                                   f"got {hi} with {low} {lo}")

    @property
    def family(self) -> str:
        """The module that builds it: a kind, `reuse` or `jsonl`."""
        if self.kind.startswith("reuse:"):
            return "reuse"
        if self.kind.endswith(".jsonl"):
            return "jsonl"
        return "synthetic" if self.kind == "random" else self.kind

    @property
    def needs_tokenizer(self) -> bool:
        """Sent as text, only a .jsonl of conversations needs no tokenizer."""
        return self.family != "jsonl"

    @property
    def distinct_prompts(self) -> int:
        """Distinct prompts per point (batch row) of a suite: one pass over a workload with an end (every needle
        instance, every turn of every conversation...), else `samples`."""
        return self.natural_count or self.samples

    @property
    def natural_count(self) -> int | None:
        """Requests in one pass over the workload (None: it has no end)."""
        if self.kind == "prefix-repetition":
            return self.prefixes * self.suffixes
        if self.kind == "multi-turn":
            return self.conversations * self.turns
        if self.kind == "needle":
            return len(self.tasks) * len(self.depths)
        if self.family == "jsonl":
            return len(read_conversations(Path(self.kind)))
        return None
