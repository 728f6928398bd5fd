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
class SuiteSpec:
    name: str
    description: str = ""
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
    trials: int = 3
    warmup: int = 1
    ignore_eos: bool = True  # fixed-length outputs, so every strategy does the same work
    baseline: str | None = None  # strategy the report computes speedups against
    quality: bool = False  # also measure output quality against `dynamic` (untimed)
    quick: dict = field(default_factory=dict, compare=False)  # overrides applied by --quick

    def __post_init__(self):
        if not self.strategies:
            raise KvbenchError(f"suite {self.name!r} lists no strategies")
        labels = [s.label for s in self.variants()]
        if self.baseline is not None and self.baseline not in labels:
            raise KvbenchError(f"baseline {self.baseline!r} is not among the suite's strategies {labels}")
        _require_positive("output_tokens", self.output_tokens)
        _require_positive("batch_sizes", self.batch_sizes)
        _require_positive("prompt_tokens", [p for p in self.prompt_tokens if p is not None])
        if self.trials < 1:
            raise KvbenchError(f"trials must be >= 1, got {self.trials}")
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
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    d["workload"] = dataclasses.asdict(spec.workload)
    for key in SUITE_AXES:  # the suite's own lists set them per point
        d["workload"].pop(key)
    d["workload"]["prompts"] = list(d["workload"]["prompts"])
    d["strategies"] = [s.name if not s.params else {"name": s.name, **dict(s.params)} for s in spec.strategies]
    for key in ("models", "prompt_tokens", "output_tokens", "batch_sizes", "budgets"):
        d[key] = list(d[key])
    d["quick"] = dict(spec.quick)
    return d


def suite_fields(data: dict, cls: type, what: str) -> dict:
    """A suite's raw keys checked against the spec dataclass `cls` (names and types); a suite needs a name."""
    checked = checked_fields(cls, data, f"{what} key")
    if "name" not in checked:
        raise KvbenchError("a suite needs a name")
    return checked


def from_dict(data: dict) -> SuiteSpec:
    data = dict(data)
    if isinstance(data.get("workload"), dict):
        if axes := SUITE_AXES & set(data["workload"]):
            raise KvbenchError(f"workload key(s) {', '.join(sorted(axes))} belong to the suite, which sweeps them: "
                               "write them one level up, as lists (prompt_tokens: [512])")
        data["workload"] = WorkloadSpec(**checked_fields(WorkloadSpec, data["workload"], "workload key"))
    if data.get("strategies") in ("all", ["all"]):
        data["strategies"] = STRATEGIES.names()
    if isinstance(data.get("strategies"), (list, tuple)):
        data["strategies"] = [parse_strategy(s) for s in data["strategies"]]
    return SuiteSpec(**suite_fields(data, SuiteSpec, "suite"))


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
    if "kind" in data:
        from kvbench.bench.reuse_spec import KINDS, spec_from_dict

        if data["kind"] not in KINDS:
            raise KvbenchError(f"suite {name_or_path!r} has unknown kind {data['kind']!r}; valid: {', '.join(KINDS)} "
                               "(or no kind: a sweep of strategies)")
        return spec_from_dict(data)
    return from_dict(data)
