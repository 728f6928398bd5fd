"""The `load` kind: open-loop request rates against an OpenAI-compatible server (vLLM, SGLang, llama.cpp, ...).

A load spec is a YAML file like any suite (`kind: load`, `url: ...`) or the flags of `kvbench load`;
each request rate is one point. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import httpx

from kvbench.bench.spec import RunSpec
from kvbench.errors import KvbenchError
from kvbench.fields import checked_fields
from kvbench.load.aggregate import parse_slo
from kvbench.load.arrivals import Arrivals, parse_rate
from kvbench.load.stream import ENDPOINTS
from kvbench.workloads import WorkloadSpec

DEFAULT_REQUESTS = 50  # when neither num_requests nor duration_s is given and the workload has no natural size


@dataclass(frozen=True)
class RatePoint:
    rate: float

    @property
    def key(self) -> str:
        return rate_label(self.rate)


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


@dataclass(frozen=True)
class LoadSpec(RunSpec):
    """Everything a load run depends on; `kvbench load`'s flag defaults are these."""

    kind: ClassVar[str] = "load"
    unit: ClassVar[str] = "request"

    name: str = "load"
    url: str = ""
    model: str | None = None  # None: the one model the server lists
    endpoint: str = "completions"
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    slo: dict[str, float] | None = None
    seed: int = 0
    timeout_s: float = 600.0
    tokenizer: str | None = None  # for the generated workloads and for counts a server does not report
    ignore_eos: bool = False
    # False: each rate sends its own prompts, so a server's prefix cache is not warm from the rates before
    same_prompts_each_rate: bool = False
    max_error_rate: float | None = None  # above it at any rate, the command exits 1 (the records are kept)
    workers: int = 1  # client processes sending the requests (kvbench.load.workers), for rates one cannot hold

    def __post_init__(self):
        super().__post_init__()
        if self.trials != 1:
            raise KvbenchError("a load run measures each request rate once (trials: 1); repeat it with another --out")
        if self.endpoint not in ENDPOINTS:
            raise KvbenchError(f"unknown endpoint {self.endpoint!r}; valid: {', '.join(ENDPOINTS)}")
        check_url(self.url)
        if not self.request_rates:
            raise KvbenchError("give at least one request rate")
        if len({rate_label(r) for r in self.request_rates}) != len(self.request_rates):
            raise KvbenchError(f"request rates repeat: {[rate_label(r) for r in self.request_rates]}")
        for rate in self.request_rates:
            Arrivals(rate, self.burstiness, self.seed)  # validates
        if self.num_requests is not None and self.duration_s is not None:
            raise KvbenchError("give --num-requests or --duration, not both")
        if self.num_requests is not None and self.num_requests < 1:
            raise KvbenchError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise KvbenchError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.workers < 1:
            raise KvbenchError(f"--workers must be >= 1, got {self.workers}")
        if self.max_concurrency is not None and self.workers > self.max_concurrency:
            raise KvbenchError(f"--workers {self.workers} is more than --max-concurrency {self.max_concurrency}; each "
                               "worker needs at least one request in flight")
        if self.timeout_s <= 0:
            raise KvbenchError(f"--timeout must be > 0 seconds, got {self.timeout_s}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise KvbenchError(f"--max-error-rate must be a fraction from 0 to 1 (0.05 for 5%), got {self.max_error_rate}")

    def points(self) -> list[RatePoint]:
        return [RatePoint(r) for r in self.request_rates]

    def schedule(self, rate: float) -> list[float]:
        arrivals = Arrivals(rate, self.burstiness, self.seed)
        if self.duration_s is not None:
            return arrivals.schedule_for(self.duration_s)
        return arrivals.schedule(self.num_requests or self.workload.natural_count or DEFAULT_REQUESTS)

    def session(self, options):
        from kvbench.load.session import LoadSession

        return LoadSession(self, options)

    @classmethod
    def _convert(cls, data: dict) -> dict:
        return convert_open_loop(data)


def convert_open_loop(data: dict) -> dict:
    """Rates as numbers or strings ("inf", "2.5"), an SLO as a mapping or `ttft_ms=200,...`, a workload mapping
    (the fields every open-loop kind shares: load and serve)."""
    rates = data.get("request_rates")
    if isinstance(rates, (list, tuple)):
        data["request_rates"] = [parse_rate(r) if isinstance(r, str) else r for r in rates]
    if isinstance(data.get("slo"), str):
        data["slo"] = parse_slo(data["slo"])
    elif isinstance(data.get("slo"), dict):
        data["slo"] = parse_slo(",".join(f"{k}={v}" for k, v in data["slo"].items()))
    if isinstance(data.get("workload"), dict):
        data["workload"] = WorkloadSpec(**checked_fields(WorkloadSpec, data["workload"], "workload key"))
    return data


def check_url(url: str) -> None:
    """Refuse an API root that cannot be a server's address, before any request is sent."""
    if not url:
        raise KvbenchError("a load run needs the server's API root: give --url (or `url:` in the spec), "
                           "e.g. http://127.0.0.1:8000/v1")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        reason = str(exc)
    else:
        reason = ("it must start with http:// or https://" if parsed.scheme not in ("http", "https")
                  else "it contains whitespace" if any(c.isspace() for c in url)
                  else "it names no host" if not parsed.host
                  else "its port is out of range" if parsed.port is not None and not 0 < parsed.port < 65536
                  else None)
    if reason:
        raise KvbenchError(f"--url {url!r} is not a server address: {reason}; write e.g. http://127.0.0.1:8000/v1")

