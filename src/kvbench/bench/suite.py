"""The `suite` kind: a sweep of cache strategies over prompt lengths, output lengths, batch sizes and models.

`points()` is the cross product of strategies (each budget of `budgets` for those that take one) x
prompt lengths x output lengths x batch sizes (x models), each measured `trials` times after `warmup`
untimed runs; strategies of one shape take turns trial by trial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from kvbench.bench.spec import RunSpec
from kvbench.errors import KvbenchError
from kvbench.fields import checked_fields
from kvbench.models import EMBEDDED
from kvbench.strategies import STRATEGIES, build_strategy
from kvbench.workloads import WorkloadSpec

SUITE_AXES = {"prompt_tokens", "output_tokens"}  # WorkloadSpec fields a suite sweeps itself


@dataclass(frozen=True)
class StrategyRef:
    """A strategy name with the hyperparameters a suite sets for it."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.params)}]"

    def build(self):
        return build_strategy(self.name, **dict(self.params))


def parse_strategy(entry: Any) -> StrategyRef:
    """`name`, `name:key=value:key=value` (CLI) or `{name: ..., key: value}` (YAML)."""
    if isinstance(entry, StrategyRef):
        return entry
    if isinstance(entry, dict):
        params = {k: v for k, v in entry.items() if k != "name"}
        if "name" not in entry:
            raise KvbenchError(f"strategy entry {entry} needs a name")
        ref = StrategyRef(entry["name"], tuple(sorted(params.items())))
    elif isinstance(entry, str):
        name, *pairs = entry.split(":")
        params = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise KvbenchError(f"cannot read {pair!r} in strategy {entry!r}; write name:key=value")
            if key in params:
                raise KvbenchError(f"strategy {entry!r} sets {key} twice; keep one value")
            params[key] = yaml.safe_load(value)
        ref = StrategyRef(name, tuple(sorted(params.items())))
    else:
        raise KvbenchError(f"cannot read strategy entry {entry!r}")
    ref.build()  # validates name and parameters now, with the valid values in the message
    return ref


@dataclass(frozen=True)
class Point:
    """One measured configuration of a sweep."""

    model: str
    strategy: StrategyRef
    prompt_tokens: int | None  # None: text prompts as written
    output_tokens: int
    batch_size: int
    model_in_key: bool = False  # only sweeps over several models name the model in each key

    @property
    def key(self) -> str:
        key = f"{self.strategy.label}/p{self.prompt_tokens or 'text'}/o{self.output_tokens}/b{self.batch_size}"
        return f"{self.model}/{key}" if self.model_in_key else key


@dataclass(frozen=True)
class SuiteSpec(RunSpec):
    """A sweep of strategies: the cross product of strategies x prompt lengths x output lengths x batch sizes."""

    kind: ClassVar[str] = "suite"

    model: str = EMBEDDED
    models: tuple[str, ...] = ()  # a model-size axis; when set it replaces `model`
    device: str = "auto"
    dtype: str = "auto"
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    strategies: tuple[StrategyRef, ...] = (StrategyRef("dynamic"),)
    budgets: tuple[float | int, ...] = ()  # swept for every strategy with a `budget` it does not fix itself
    prompt_tokens: tuple[int | None, ...] = (None,)
    output_tokens: tuple[int, ...] = (32,)
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 1
    ignore_eos: bool = True  # fixed-length outputs, so every strategy does the same work
    baseline: str | None = None  # strategy the report computes speedups against
    quality: bool = False  # also measure output quality against `dynamic` (untimed)
    trials: int = 3

    def __post_init__(self):
        super().__post_init__()
        if not self.strategies:
            raise KvbenchError(f"suite {self.name!r} lists no strategies")
        labels = [s.label for s in self.variants()]
        if self.baseline is not None and self.baseline not in labels:
            raise KvbenchError(f"baseline {self.baseline!r} is not among the suite's strategies {labels}")
        _require_positive("output_tokens", self.output_tokens)
        _require_positive("batch_sizes", self.batch_sizes)
        _require_positive("prompt_tokens", [p for p in self.prompt_tokens if p is not None])
        if self.warmup < 0:
            raise KvbenchError(f"warmup must be >= 0, got {self.warmup}")

    def variants(self) -> list[StrategyRef]:
        """The strategies to measure: each entry, times every budget when it has one to sweep."""
        out = []
        for ref in self.strategies:
            sweeps_budget = "budget" in {f.name for f in dataclasses.fields(STRATEGIES.get(ref.name))}
            if self.budgets and sweeps_budget and "budget" not in dict(ref.params):
                out += [StrategyRef(ref.name, tuple(sorted({**dict(ref.params), "budget": b}.items())))
                        for b in self.budgets]
            else:
                out.append(ref)
        for ref in out:
            ref.build()  # a budget that this strategy rejects fails here, before anything runs
        return out

    def model_names(self) -> tuple[str, ...]:
        return self.models or (self.model,)

    def points(self) -> list[Point]:
        variants, models = self.variants(), self.model_names()
        return [
            Point(m, s, p, o, b, model_in_key=len(models) > 1)
            for m in models
            for p in self.prompt_tokens
            for o in self.output_tokens
            for b in self.batch_sizes
            for s in variants
        ]

    def session(self, options):
        from kvbench.bench.suite_session import SuiteSession

        return SuiteSession(self, options)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for key in SUITE_AXES:  # the suite's own lists set them per point
            d["workload"].pop(key)
        d["strategies"] = [s.name if not s.params else {"name": s.name, **dict(s.params)} for s in self.strategies]
        return d

    @classmethod
    def _convert(cls, data: dict) -> dict:
        if isinstance(data.get("workload"), dict):
            if axes := SUITE_AXES & set(data["workload"]):
                raise KvbenchError(f"workload key(s) {', '.join(sorted(axes))} belong to the suite, which sweeps them: "
                                   "write them one level up, as lists (prompt_tokens: [512])")
            data["workload"] = WorkloadSpec(**checked_fields(WorkloadSpec, data["workload"], "workload key"))
        if data.get("strategies") in ("all", ["all"]):
            data["strategies"] = STRATEGIES.names()
        if isinstance(data.get("strategies"), (list, tuple)):
            data["strategies"] = [parse_strategy(s) for s in data["strategies"]]
        return data


def _require_positive(name: str, values) -> None:
    bad = [v for v in values if not isinstance(v, int) or v <= 0]
    if bad:
        raise KvbenchError(f"{name} must be positive integers, got {bad}")
