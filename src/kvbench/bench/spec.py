"""Run specs: every kind of run (suite, reuse, traffic, load, serve) is one frozen dataclass with a `kind`.

One loader for all of them (a shipped name or a YAML file; YAML < `quick:` block under --quick <
flags), one validation path (`kvbench.fields`: unknown keys listed with the valid ones, types
checked, scalars where lists belong refused), one `to_dict` (saved in run.json) and one digest (what
is measured, to refuse resuming a different run). A kind is a spec class plus a session that
measures one point (`kvbench.bench.runner.Session`); KINDS names the module of each, imported only
when a spec of that kind is read, so a load spec never imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from kvbench.errors import KvbenchError
from kvbench.fields import checked_fields

# kind -> "module:SpecClass"
KINDS = {
    "suite": "kvbench.bench.suite:SuiteSpec",
    "reuse": "kvbench.bench.reuse_spec:ReuseSuiteSpec",
    "traffic": "kvbench.bench.reuse_spec:TrafficSuiteSpec",
    "load": "kvbench.load.spec:LoadSpec",
    "serve": "kvbench.bench.serve_spec:ServeSpec",
}
DEFAULT_KIND = "suite"  # a spec file without `kind` is a sweep of strategies
UNMEASURED = ("trials", "warmup", "quick", "description")  # fields that do not change what one point measures


@dataclass(frozen=True)
class RunSpec:
    """Fields and calls every kind shares. Subclasses add their fields (all with defaults) and `points()`."""

    kind: ClassVar[str]
    unit: ClassVar[str] = "trial"  # what one (point, trial) is, for --dry-run

    name: str
    description: str = ""
    trials: int = 1
    quick: dict = field(default_factory=dict, compare=False)  # overrides applied by --quick

    def __post_init__(self):
        if self.trials < 1:
            raise KvbenchError(f"trials must be >= 1, got {self.trials}")

    def points(self) -> list:
        """What one run measures, each `trials` times; every point has a unique `key`."""
        raise NotImplementedError

    def session(self, options):
        """The object that measures this spec's points (`kvbench.bench.runner.Session`)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        """A spec from raw values (YAML, flags): checked against the fields, then converted by `_convert`."""
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise KvbenchError(f"a {cls.kind} spec cannot have kind {kind!r}")
        checked = checked_fields(cls, cls._convert(data), f"{cls.kind} key")
        if "name" not in checked:
            raise KvbenchError(f"a {cls.kind} spec needs a name")
        return cls(**checked)

    @classmethod
    def _convert(cls, data: dict) -> dict:
        """Raw values that need more than a type check (strategy entries, nested workloads); as given by default."""
        return data

    def to_dict(self) -> dict:
        """Plain values (lists, dicts, numbers, strings) that `from_dict` reads back into an equal spec."""
        return {"kind": self.kind, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def resolved(self, quick: bool = False, **overrides: Any) -> RunSpec:
        """A copy with the `quick` block applied (when asked), then the given non-None overrides, validated again."""
        data = self.to_dict()
        if quick:
            data.update(self.quick)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).from_dict(data)

    def digest(self) -> str:
        """Identity of what is measured (not of how many trials), to refuse resuming a different run. Unset
        (None) values are left out at every depth, so an optional field added by a later kvbench does not
        turn every earlier run into "a different run"."""
        d = _without_unset({k: v for k, v in self.to_dict().items() if k not in UNMEASURED})
        return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def _without_unset(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_unset(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if to_dict else {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return "inf"  # JSON has no infinity; kinds that take one (request rates) read "inf" back
    return value


def spec_class(kind: str) -> type[RunSpec]:
    if kind not in KINDS:
        raise KvbenchError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)} (no kind: {DEFAULT_KIND})")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def spec_from_dict(data: dict) -> RunSpec:
    """A spec of any kind from raw values; `kind` picks the class (none: a suite)."""
    return spec_class(data.get("kind", DEFAULT_KIND)).from_dict(data)


def spec_names() -> list[str]:
    """The specs shipped with kvbench (`suites/*.yaml`)."""
    return sorted(p.name[:-5] for p in resources.files("kvbench.suites").iterdir() if p.name.endswith(".yaml"))


def load_spec(name_or_path: str) -> RunSpec:
    """A shipped spec by name, or a YAML file by path, of any kind."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    elif name_or_path in spec_names():
        text = resources.files("kvbench.suites").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise KvbenchError(f"unknown spec {name_or_path!r}; valid: {', '.join(spec_names())} or a path to a .yaml file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KvbenchError(f"spec {name_or_path!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KvbenchError(f"spec {name_or_path!r} must be a YAML mapping")
    return spec_from_dict(data)
