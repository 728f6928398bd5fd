"""The `serve` kind: the in-process serving engine (`kvbench.serve.Engine`) under an open-loop arrival schedule.

A point is one engine variant at one request rate. Each engine variant is a mapping of `EngineConfig`
fields (passed through as they are, so fields the engine gains need no change here; `EngineConfig`
validates them) plus an optional `label`; byte sizes may be written as `256MiB`. Arrivals are the ones
`kvbench load` sends at the same rate, burstiness and seed (`kvbench.load.arrivals.Arrivals`), so an
in-process run and an HTTP run of one spec offer the same load. `streams` add further request streams
to every point's schedule, each with its own workload, count and rate (long prompts arriving among
running decodes); records name their stream, so the report can split latencies by request class.

`engine_axes` crosses every engine with values of `EngineConfig` fields (`{kv_cache_memory: [64GiB,
256MiB]}`): each engine runs once per combination, labelled `label,field=value`, and records name the
engine it came from (`method`). The `reference` engine (the first one unless named) is what the report
compares every other engine's outputs with: output length and greedy agreement on the same requests at
the same rate and axis values (with `ignore_eos: false` outputs end where each model stops).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvbench.bench.preflight import parse_bytes
from kvbench.bench.spec import RunSpec
from kvbench.errors import KvbenchError
from kvbench.fields import checked_fields
from kvbench.load.arrivals import Arrivals, parse_rate
from kvbench.load.spec import DEFAULT_REQUESTS, convert_open_loop, rate_label
from kvbench.models import EMBEDDED
from kvbench.serve.config import BYTE_FIELDS, DEFAULT_KV_CACHE_MEMORY, EngineConfig
from kvbench.workloads import WorkloadSpec

MAIN_STREAM = "main"


@dataclass(frozen=True)
class EngineVariant:
    """One engine configuration of a serve spec: the `EngineConfig` fields it sets, and its name in point keys."""

    label: str
    fields: tuple[tuple[str, Any], ...]  # as given (sizes in bytes), in the order written
    method: str | None = None  # the spec's engine this one was crossed from (engine_axes); None: itself

    @property
    def base(self) -> str:
        return self.method or self.label

    @property
    def config(self) -> EngineConfig:
        return EngineConfig(**dict(self.fields))

    def to_dict(self) -> dict:
        return {"label": self.label, **dict(self.fields)}

    def crossed(self, axes: dict[str, Any]) -> EngineVariant:
        """This engine with the `axes` fields set (values as written), labelled `label,field=value,...`."""
        label = ",".join([self.label, *(f"{k}={v}" for k, v in axes.items())])
        fields = {**dict(self.fields), **{k: parse_bytes(v) if k in BYTE_FIELDS and isinstance(v, str) else v
                                         for k, v in axes.items()}}
        checked = checked_fields(EngineConfig, fields, "engine_axes key")
        EngineConfig(**checked)
        return EngineVariant(label, tuple(checked.items()), self.label)


def parse_engine(entry: Any) -> EngineVariant:
    """`{label: ..., <EngineConfig field>: value, ...}`; unknown fields are refused with the valid ones."""
    if isinstance(entry, EngineVariant):
        return entry
    if not isinstance(entry, dict):
        raise KvbenchError(f"an engine must be a mapping of EngineConfig fields (and a label), got {entry!r}; "
                           "write e.g. {kv_backend: paged, max_num_seqs: 8}")
    entry = dict(entry)
    label = entry.pop("label", None)
    fields = {k: parse_bytes(v) if k in BYTE_FIELDS and isinstance(v, str) else v for k, v in entry.items()}
    checked = checked_fields(EngineConfig, fields, "engine key")
    EngineConfig(**checked)  # its own validation (one of, positive), with the valid values in the message
    if label is None:
        label = ",".join(f"{k}={v}" for k, v in entry.items()) or "default"
    if not isinstance(label, str) or not label or any(c in label for c in "@/"):
        raise KvbenchError(f"engine label {label!r} must be a non-empty string without '@' or '/'")
    return EngineVariant(label, tuple(checked.items()))


def strategy_budget(strategy: str | None) -> float | int | None:
    """The `budget` of an engine's strategy (`h2o:budget=0.25`), None for a strategy without one."""
    if strategy is None:
        return None
    from kvbench.bench.suite import parse_strategy

    return getattr(parse_strategy(strategy).build(), "budget", None)


@dataclass(frozen=True)
class StreamSpec:
    """Further requests merged into every point's schedule: `num_requests` of `workload`, arriving at
    `request_rate` (with the spec's burstiness; stream i seeded seed + 1 + i) from `start_s` on."""

    tag: str
    workload: WorkloadSpec
    num_requests: int
    request_rate: float = math.inf
    start_s: float = 0.0

    def __post_init__(self):
        if self.tag == MAIN_STREAM or not self.tag:
            raise KvbenchError(f"a stream's tag must be a name other than {MAIN_STREAM!r}")
        if self.num_requests < 1 or not 0 <= self.start_s < math.inf:
            raise KvbenchError(f"stream {self.tag!r}: num_requests must be >= 1 and start_s a finite number >= 0")


def parse_stream(entry: Any) -> StreamSpec:
    if isinstance(entry, StreamSpec):
        return entry
    if not isinstance(entry, dict):
        raise KvbenchError(f"a stream must be a mapping (tag, workload, num_requests, request_rate, start_s), "
                           f"got {entry!r}")
    data = dict(entry)
    if isinstance(data.get("request_rate"), str):
        data["request_rate"] = parse_rate(data["request_rate"])
    if isinstance(data.get("workload"), dict):
        data["workload"] = WorkloadSpec(**checked_fields(WorkloadSpec, data["workload"], "workload key"))
    checked = checked_fields(StreamSpec, data, "stream key")
    if "tag" not in checked or "workload" not in checked or "num_requests" not in checked:
        raise KvbenchError(f"stream {entry!r} needs a tag, a workload and num_requests")
    return StreamSpec(**checked)


@dataclass(frozen=True)
class ServePoint:
    engine: EngineVariant
    rate: float

    @property
    def key(self) -> str:
        return f"{self.engine.label}@{rate_label(self.rate)}"

    def fields(self) -> dict:
        """What every record and summary row of the point names."""
        config = self.engine.config
        return {"engine": self.engine.label, "method": self.engine.base, "kv_backend": config.kv_backend,
                "strategy": getattr(config, "strategy", None), "budget": strategy_budget(config.strategy),
                "max_num_seqs": config.max_num_seqs,
                "request_rate": rate_label(self.rate),
                "kv_cache_memory": config.kv_cache_memory or (DEFAULT_KV_CACHE_MEMORY if config.num_blocks is None
                                                              else None)}


@dataclass(frozen=True)
class ServeSpec(RunSpec):
    kind: ClassVar[str] = "serve"
    unit: ClassVar[str] = "request"

    model: str = EMBEDDED
    device: str = "auto"
    dtype: str = "auto"
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    num_requests: int | None = None  # None: the workload's natural count, else DEFAULT_REQUESTS
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    seed: int = 0
    ignore_eos: bool = True  # fixed output lengths (each request's max_tokens), so every engine does the same work
    slo: dict[str, float] | None = None
    warmup: int = 0  # untimed whole trials per point (a short engine run always precedes the first measurement)
    engines: tuple[EngineVariant, ...] = (EngineVariant("paged", (("kv_backend", "paged"),)),)
    engine_axes: dict[str, tuple] | None = None  # EngineConfig field -> values, crossed with every engine
    reference: str | None = None  # the engine (label) outputs are compared with; None: the first
    streams: tuple[StreamSpec, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.request_rates:
            raise KvbenchError("give at least one request rate")
        if len({rate_label(r) for r in self.request_rates}) != len(self.request_rates):
            raise KvbenchError(f"request rates repeat: {[rate_label(r) for r in self.request_rates]}")
        for rate in (*self.request_rates, *(s.request_rate for s in self.streams)):
            Arrivals(rate, self.burstiness, self.seed)  # validates
        if self.num_requests is not None and self.num_requests < 1:
            raise KvbenchError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.warmup < 0:
            raise KvbenchError(f"warmup must be >= 0, got {self.warmup}")
        if not self.engines:
            raise KvbenchError(f"serve spec {self.name!r} lists no engines")
        labels = [e.label for e in self.engines]
        if len(set(labels)) != len(labels):
            raise KvbenchError(f"engine labels repeat: {labels}; give each engine a distinct `label`")
        if self.reference is not None and self.reference not in labels:
            raise KvbenchError(f"reference {self.reference!r} is not an engine label; valid: {', '.join(labels)}")
        for key, values in (self.engine_axes or {}).items():
            if not isinstance(values, (list, tuple)) or not values:
                raise KvbenchError(f"engine_axes {key} must be a non-empty list of values, got {values!r}")
            if len(set(map(str, values))) != len(values):
                raise KvbenchError(f"engine_axes {key} repeats a value: {list(values)}")
        self.variants()  # every crossed engine validates
        tags = [s.tag for s in self.streams]
        if len(set(tags)) != len(tags):
            raise KvbenchError(f"stream tags repeat: {tags}")

    @property
    def reference_engine(self) -> str:
        return self.reference or self.engines[0].label

    def variants(self) -> list[EngineVariant]:
        """The engines crossed with `engine_axes`, engine by engine, the last axis varying fastest."""
        if not self.engine_axes:
            return list(self.engines)
        keys = list(self.engine_axes)
        combos = [dict(zip(keys, values)) for values in itertools.product(*self.engine_axes.values())]
        return [engine.crossed(combo) for engine in self.engines for combo in combos]

    def points(self) -> list[ServePoint]:
        """Engines take turns at each rate (the runner interleaves them trial by trial)."""
        return [ServePoint(e, r) for r in self.request_rates for e in self.variants()]

    def main_count(self) -> int:
        return self.num_requests or self.workload.natural_count or DEFAULT_REQUESTS

    def schedule(self, rate: float) -> list[tuple[str, float]]:
        """(stream tag, arrival offset in seconds) of every request of a point at `rate`: the main stream's offsets
        are those `kvbench load` sends at that rate, then each stream's, in stream order."""
        out = [(MAIN_STREAM, t) for t in Arrivals(rate, self.burstiness, self.seed).schedule(self.main_count())]
        for i, s in enumerate(self.streams):  # each stream its own seed, so its gaps are not the main stream's
            arrivals = Arrivals(s.request_rate, self.burstiness, self.seed + 1 + i)
            out += [(s.tag, s.start_s + t) for t in arrivals.schedule(s.num_requests)]
        return out

    def session(self, options):
        from kvbench.bench.serve_session import ServeSession

        return ServeSession(self, options)

    @classmethod
    def _convert(cls, data: dict) -> dict:
        data = convert_open_loop(data)
        if isinstance(data.get("engines"), (list, tuple)):
            data["engines"] = [parse_engine(e) for e in data["engines"]]
        if isinstance(data.get("engine_axes"), dict):
            data["engine_axes"] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["engine_axes"].items()}
        if isinstance(data.get("streams"), (list, tuple)):
            data["streams"] = [parse_stream(s) for s in data["streams"]]
        return data
