"""`kvbench load`: one open-loop run per request rate against a server, records appended as they end.

Data flows one way: config -> workload requests + arrival schedule -> streaming client ->
results.jsonl (+ run.json with the config, environment and server-metric deltas). The report
reads only those files.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from kvbench.bench.environment import describe_host
from kvbench.bench.records import RESULTS, RUN_INFO, ResultsWriter, atomic_write_text
from kvbench.clients.arrivals import Arrivals
from kvbench.clients.loadgen import run_load
from kvbench.clients.probe import check_server, served_models
from kvbench.clients.prometheus import scrape, server_deltas
from kvbench.clients.stream import ENDPOINTS, Endpoint
from kvbench.clients.workloads import LoadWorkload, Tokenizer, build_requests, load_tokenizer
from kvbench.errors import KvbenchError

DEFAULT_REQUESTS = 50  # when neither --num-requests nor --duration is given and the workload has no natural size


@dataclass(frozen=True)
class LoadConfig:
    """Everything a load run depends on; the CLI's defaults are these."""

    url: str
    model: str | None = None  # None: the one model the server lists
    endpoint: str = "completions"
    workload: LoadWorkload = field(default_factory=LoadWorkload)
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

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise KvbenchError(f"unknown endpoint {self.endpoint!r}; valid: {', '.join(ENDPOINTS)}")
        check_url(self.url)
        if not self.request_rates:
            raise KvbenchError("give at least one request rate")
        for rate in self.request_rates:
            Arrivals(rate, self.burstiness, self.seed)  # validates
        if self.num_requests is not None and self.duration_s is not None:
            raise KvbenchError("give --num-requests or --duration, not both")
        if self.num_requests is not None and self.num_requests < 1:
            raise KvbenchError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise KvbenchError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.timeout_s <= 0:
            raise KvbenchError(f"--timeout must be > 0 seconds, got {self.timeout_s}")

    def schedule(self, rate: float) -> list[float]:
        arrivals = Arrivals(rate, self.burstiness, self.seed)
        if self.duration_s is not None:
            return arrivals.schedule_for(self.duration_s)
        return arrivals.schedule(self.num_requests or self.workload.natural_count or DEFAULT_REQUESTS)


def check_url(url: str) -> None:
    """Refuse an API root that cannot be a server's address, before any request is sent."""
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


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


@dataclass(frozen=True)
class LoadOutcome:
    records: int
    planned: int
    partial: bool


def run_load_config(config: LoadConfig, out: Path, progress: bool = True) -> LoadOutcome:
    """Measure every request rate of `config` into `out`; Ctrl-C keeps what was measured and marks it partial."""
    from kvbench.bench.runner import prepare_out_dir

    prepare_out_dir(out)
    if (out / RESULTS).exists() and (out / RESULTS).stat().st_size:
        raise KvbenchError(f"{out} already holds results; choose another --out")
    tokenizer = _tokenizer(config)
    schedules = {rate_label(r): config.schedule(r) for r in config.request_rates}  # config errors before the probe
    planned = sum(len(s) for s in schedules.values())
    requests = build_requests(config.workload, max(len(s) for s in schedules.values()), tokenizer)
    info = {"kind": "load", "config": asdict(config), "environment": describe_host(), "partial": True,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "points": {}}
    endpoint, models = asyncio.run(_prepare(config))
    info["server"] = {"models": models, "model": endpoint.model}
    atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2))
    written = 0
    bar = tqdm(total=planned, desc="load", unit="req", disable=not progress)
    with ResultsWriter(out / RESULTS) as writer:
        def on_record(label: str):
            def write(record: dict) -> None:
                nonlocal written
                writer.append({"request_rate": label, **record})
                written += 1
                bar.update(1)
            return write

        try:
            for label, schedule in schedules.items():
                info["points"][label] = {"planned": len(schedule)}
                metrics = asyncio.run(_one_rate(config, endpoint, requests[:len(schedule)], schedule,
                                                on_record(label), tokenizer))
                info["points"][label]["server_metrics"] = metrics
            info["partial"] = False
        finally:
            bar.close()
            info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2))
    return LoadOutcome(records=written, planned=planned, partial=info["partial"])


def _tokenizer(config: LoadConfig) -> Tokenizer | None:
    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer)
    if config.workload.needs_tokenizer:
        raise KvbenchError(f"the {config.workload.kind} workload builds prompts with the served model's tokenizer; "
                           "give --tokenizer (a local model dir, a cached hub id, or smollm2-135m)")
    return None


async def _prepare(config: LoadConfig) -> tuple[Endpoint, list[str] | None]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(min(config.timeout_s, 30.0))) as client:
        models = await served_models(client, config.url)
    model = config.model
    if model is None:
        if not models or len(models) != 1:
            raise KvbenchError(f"give --model; the server lists {', '.join(models) if models else 'no models'}")
        model = models[0]
    endpoint = Endpoint(config.url, model, config.endpoint, config.timeout_s, config.ignore_eos)
    await check_server(endpoint, models)
    return endpoint, models


async def _one_rate(config: LoadConfig, endpoint: Endpoint, requests, schedule, on_record, tokenizer) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        before = await scrape(client, config.url)
        await run_load(endpoint, requests, schedule, on_record, config.max_concurrency, tokenizer)
        after = await scrape(client, config.url) if before is not None else None
    return server_deltas(before, after)
