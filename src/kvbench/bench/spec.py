"""Suite specs: frozen dataclasses are the single source of defaults; YAML < --quick < CLI flags.

A suite names a model, a workload and the sweep axes; `points()` is the cross product of
strategies x prompt lengths x output lengths x batch sizes, each measured `trials` times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kvbench.bench.workloads import WorkloadSpec
from kvbench.errors import KvbenchError
from kvbench.models import EMBEDDED
from kvbench.strategies import STRATEGIES


@dataclass(frozen=True)
class Point:
    """One measured configuration of a sweep."""

    strategy: str
    prompt_tokens: int | None  # None: text prompts as written
    output_tokens: int
    batch_size: int

    @property
    def key(self) -> str:
        return f"{self.strategy}/p{self.prompt_tokens or 'text'}/o{self.output_tokens}/b{self.batch_size}"


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    description: str = ""
    model: str = EMBEDDED
    device: str = "auto"
    dtype: str = "auto"
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    strategies: tuple[str, ...] = ("dynamic",)
    prompt_tokens: tuple[int | None, ...] = (None,)
    output_tokens: tuple[int, ...] = (32,)
    batch_sizes: tuple[int, ...] = (1,)
    trials: int = 3
    warmup: int = 1
    ignore_eos: bool = True  # fixed-length outputs, so every strategy does the same work
    baseline: str | None = None  # strategy the report computes speedups against
    quick: dict = field(default_factory=dict, compare=False)  # overrides applied by --quick

    def __post_init__(self):
        for name in self.strategies:
            STRATEGIES.get(name)  # raises with the valid names
        if not self.strategies:
            raise KvbenchError(f"suite {self.name!r} lists no strategies")
        if self.baseline is not None and self.baseline not in self.strategies:
            raise KvbenchError(f"baseline {self.baseline!r} is not among the suite's strategies {list(self.strategies)}")
        _require_positive("output_tokens", self.output_tokens)
        _require_positive("batch_sizes", self.batch_sizes)
        _require_positive("prompt_tokens", [p for p in self.prompt_tokens if p is not None])
        if self.trials < 1:
            raise KvbenchError(f"trials must be >= 1, got {self.trials}")
        if self.warmup < 0:
            raise KvbenchError(f"warmup must be >= 0, got {self.warmup}")

    def points(self) -> list[Point]:
        return [
            Point(s, p, o, b)
            for p in self.prompt_tokens
            for o in self.output_tokens
            for b in self.batch_sizes
            for s in self.strategies
        ]

    def with_overrides(self, **overrides: Any) -> SuiteSpec:
        """A copy with the given fields replaced (None values ignored), validated again."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return from_dict({**to_dict(self), **given})

    def resolved(self, quick: bool) -> SuiteSpec:
        return self.with_overrides(**self.quick) if quick else self

    def digest(self) -> str:
        """Identity of what is measured (not of how many trials), to refuse resuming a different sweep."""
        d = to_dict(self)
        for key in ("trials", "warmup", "quick", "description"):
            d.pop(key)
        return hashlib.blake2b(json.dumps(d, sort_keys=True).encode(), digest_size=8).hexdigest()


def _require_positive(name: str, values) -> None:
    bad = [v for v in values if not isinstance(v, int) or v <= 0]
    if bad:
        raise KvbenchError(f"{name} must be positive integers, got {bad}")


def to_dict(spec: SuiteSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["workload"]["prompts"] = list(d["workload"]["prompts"])
    for key in ("strategies", "prompt_tokens", "output_tokens", "batch_sizes"):
        d[key] = list(d[key])
    return d


def from_dict(data: dict) -> SuiteSpec:
    valid = {f.name for f in dataclasses.fields(SuiteSpec)}
    unknown = set(data) - valid
    if unknown:
        raise KvbenchError(f"unknown suite key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}")
    if "name" not in data:
        raise KvbenchError("a suite needs a name")
    data = dict(data)
    workload = data.get("workload", {})
    if isinstance(workload, dict):
        wvalid = {f.name for f in dataclasses.fields(WorkloadSpec)}
        if set(workload) - wvalid:
            raise KvbenchError(
                f"unknown workload key(s) {', '.join(sorted(set(workload) - wvalid))}; valid: {', '.join(sorted(wvalid))}"
            )
        if "prompts" in workload:
            workload = {**workload, "prompts": tuple(workload["prompts"])}
        data["workload"] = WorkloadSpec(**workload)
    if data.get("strategies") in ("all", ["all"]):
        data["strategies"] = STRATEGIES.names()
    for key in ("strategies", "prompt_tokens", "output_tokens", "batch_sizes"):
        if key in data:
            value = data[key]
            data[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return SuiteSpec(**data)


def suite_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("kvbench.suites").iterdir() if p.name.endswith(".yaml"))


def load_suite(name_or_path: str) -> SuiteSpec:
    """A shipped suite by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    elif name_or_path in suite_names():
        text = resources.files("kvbench.suites").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise KvbenchError(f"unknown suite {name_or_path!r}; valid: {', '.join(suite_names())} or a path to a .yaml file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KvbenchError(f"suite {name_or_path!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KvbenchError(f"suite {name_or_path!r} must be a YAML mapping")
    return from_dict(data)
