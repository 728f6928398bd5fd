"""Specs of the reuse suites (`kind: reuse` and `kind: traffic` in a suite file).

`reuse`: workloads x modes, each a sequence of requests that re-send the same context; request 0 is
cold. Modes: `none` (no reuse, the reference for greedy match and cold TTFT), `prefix`, and
`chunk:<recompute>` with recompute `none`, `selective` or `cacheblend`, optionally with its budget after it
(`chunk:selective:tokens=128`, `chunk:cacheblend:fraction=0.3:layer=2`; default: the spec's). With
`teacher_forced`, every request also gets teacher-forced top-1 agreement and KL against no reuse (untimed).
`break_even` lengths add `break-even-N` sequences measured from each of `tiers` (ram, disk).

`traffic`: request streams (uniform, Zipf, temporal locality) over a pool of documents, with a RAM
tier too small for the whole pool, so hit rate and memory move with the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.bench.spec import RunSpec
from kvbench.errors import KvbenchError
from kvbench.models import EMBEDDED
from kvbench.reuse import ReuseConfig
from kvbench.reuse.assemble import RECOMPUTE
from kvbench.workloads.reuse import check_name

TIERS = ("ram", "disk")
STREAMS = ("uniform", "zipf", "temporal")


_BUDGETS = {"tokens": ("selective_tokens", int), "fraction": ("blend_fraction", float), "layer": ("probe_layer", int)}


def parse_mode(mode: str) -> tuple[str, str | None]:
    """`none` | `prefix` | `chunk:<recompute>[:budget=value...]` -> (reuse_mode, recompute)."""
    base, _, rest = mode.partition(":")
    recompute = rest.split(":")[0]
    if base in ("none", "prefix") and not rest:
        return base, None
    if base == "chunk" and recompute in RECOMPUTE:
        mode_budgets(mode)
        return base, recompute
    raise KvbenchError(
        f"unknown reuse mode {mode!r}; valid: none, prefix, {', '.join('chunk:' + r for r in RECOMPUTE)}, "
        f"each chunk mode optionally with {', '.join(k + '=' for k in _BUDGETS)} (chunk:selective:tokens=64)"
    )


def mode_budgets(mode: str) -> dict:
    """The ReuseConfig fields a mode sets: `chunk:cacheblend:fraction=0.3:layer=2` -> blend_fraction, probe_layer."""
    out = {}
    for item in mode.split(":")[2:]:
        key, _, value = item.partition("=")
        if key not in _BUDGETS:
            raise KvbenchError(f"unknown recompute budget {key!r} in reuse mode {mode!r}; valid: {', '.join(_BUDGETS)}")
        field, kind = _BUDGETS[key]
        try:
            out[field] = kind(value)
        except ValueError:
            raise KvbenchError(f"{key} in reuse mode {mode!r} must be a number, got {value!r}") from None
    return out


@dataclass(frozen=True)
class ReusePoint:
    workload: str
    mode: str  # as written in the spec: none, prefix, chunk:selective...
    tier: str = "ram"

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.mode}/{self.tier}"


@dataclass(frozen=True)
class _ReuseSpecBase(RunSpec):
    """Fields the reuse and traffic kinds share."""

    unit: ClassVar[str] = "request sequence"

    model: str = EMBEDDED
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 64
    seed: int = 0

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise KvbenchError(f"{name} must be >= 1, got {getattr(self, name)}")

    def session(self, options):
        from kvbench.bench.reuse_session import ReuseSession, TrafficSession

        return (ReuseSession if self.kind == "reuse" else TrafficSession)(self, options)


@dataclass(frozen=True)
class ReuseSuiteSpec(_ReuseSpecBase):
    kind: ClassVar[str] = "reuse"

    workloads: tuple[str, ...] = ("system-prompt",)
    modes: tuple[str, ...] = ("none", "prefix")
    requests: int = 4  # per sequence, the cold one included
    turns: int = 8  # multi-turn: requests of its sequence
    output_tokens: int = 32
    selective_tokens: int = 32
    blend_fraction: float = 0.15
    teacher_forced: bool = False  # teacher-forced top-1 and KL against no reuse per request (untimed)
    break_even: tuple[int, ...] = ()  # document lengths for the tier break-even sequences
    tiers: tuple[str, ...] = ("ram", "disk")

    def __post_init__(self):
        super().__post_init__()
        for w in self.workloads:
            check_name(w)
        for m in self.modes:
            parse_mode(m)
        if "none" not in self.modes:
            raise KvbenchError("a reuse suite needs mode `none`: it is the reference for speedup and greedy match")
        bad = [t for t in self.tiers if t not in TIERS]
        if bad:
            raise KvbenchError(f"unknown tier(s) {bad}; valid: {', '.join(TIERS)}")
        self._require_positive("requests", "turns", "output_tokens", "block_size", "trials")
        if self.requests < 2 or self.turns < 2:
            raise KvbenchError("requests and turns must be >= 2: one cold request and at least one warm one")
        if len(set(self.modes)) != len(self.modes) or len(set(self.workloads)) != len(self.workloads):
            raise KvbenchError("modes and workloads must not repeat")
        for m in self.modes:  # checks the budgets now, before a model loads
            ReuseConfig(block_size=self.block_size, **{"selective_tokens": self.selective_tokens,
                                                       "blend_fraction": self.blend_fraction, **mode_budgets(m)})
        if any(n < 1 for n in self.break_even):
            raise KvbenchError(f"break_even lengths must be positive, got {list(self.break_even)}")

    def points(self) -> list[ReusePoint]:
        """Per workload: `none` first (the reference), then each reuse mode from RAM; then the
        break-even sequences from every tier."""
        ordered = ["none"] + [m for m in self.modes if m != "none"]
        out = [ReusePoint(w, m, "ram" if m != "none" else "-") for w in self.workloads for m in ordered]
        for n in self.break_even:
            out.append(ReusePoint(f"break-even-{n}", "none", "-"))
            out += [ReusePoint(f"break-even-{n}", "prefix", t) for t in self.tiers]
        return out


@dataclass(frozen=True)
class TrafficSuiteSpec(_ReuseSpecBase):
    kind: ClassVar[str] = "traffic"

    streams: tuple[str, ...] = STREAMS
    documents: int = 12
    document_tokens: int = 256
    requests: int = 48
    zipf_s: float = 1.2
    locality: float = 0.8  # temporal: chance to re-send one of the last `window` documents
    window: int = 3
    ram_documents: float = 4  # RAM budget: the full blocks of this many requests (reuse_runner.ram_budget)
    disk: bool = True
    output_tokens: int = 1

    def __post_init__(self):
        super().__post_init__()
        bad = [s for s in self.streams if s not in STREAMS]
        if bad:
            raise KvbenchError(f"unknown stream(s) {bad}; valid: {', '.join(STREAMS)}")
        self._require_positive("documents", "document_tokens", "requests", "output_tokens", "block_size", "trials", "window")
        if self.ram_documents <= 0 or not 0 <= self.locality <= 1 or self.zipf_s <= 0:
            raise KvbenchError("ram_documents and zipf_s must be > 0 and locality in [0, 1]")

    def points(self) -> list[ReusePoint]:
        return [ReusePoint(s, "prefix", "ram+disk" if self.disk else "ram") for s in self.streams]
