"""`kvbench load`: one open-loop run per request rate against a server, records appended as they end.

Data flows one way: config -> workload requests + arrival schedule -> streaming client ->
results.jsonl (+ run.json with the config, environment and server-metric deltas). The report
reads only those files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
from tqdm import tqdm

from kvbench.bench.environment import describe_host
from kvbench.bench.outlock import prepare_out_dir
from kvbench.bench.records import RESULTS, RUN_INFO, ResultsWriter, atomic_write_text
from kvbench.load.arrivals import Arrivals
from kvbench.load.loadgen import event_loop, run_async, run_load
from kvbench.load.probe import check_server, served_models
from kvbench.load.prometheus import scrape, server_deltas
from kvbench.load.stream import ENDPOINTS, Endpoint
from kvbench.load.workloads import (LoadWorkload, Request, Tokenizer, build_requests, context_window,
                                      fitting_requests, load_tokenizer)
from kvbench.errors import KvbenchError

DEFAULT_REQUESTS = 50  # when neither --num-requests nor --duration is given and the workload has no natural size
# Records not yet fsynced at any moment: a crash loses at most these (Ctrl-C loses none). Writing in batches
# from a thread keeps the 3-13 ms of each fsync off the event loop that sends on schedule.
MAX_UNSYNCED_RECORDS = 256


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
    # False: each rate sends its own prompts, so a server's prefix cache is not warm from the rates before
    same_prompts_each_rate: bool = False
    max_error_rate: float | None = None  # above it at any rate, `kvbench load` exits 1 (the records are kept)

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
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise KvbenchError(f"--max-error-rate must be a fraction from 0 to 1 (0.05 for 5%), got {self.max_error_rate}")

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
    prepare_out_dir(out)
    if (out / RESULTS).exists() and (out / RESULTS).stat().st_size:
        raise KvbenchError(f"{out} already holds results; choose another --out")
    tokenizer = _tokenizer(config)
    schedules = {rate_label(r): config.schedule(r) for r in config.request_rates}  # config errors before the probe
    requests = rate_requests(config, {label: len(s) for label, s in schedules.items()}, tokenizer)
    window = fit_context(config, requests, schedules, tokenizer)
    planned = sum(len(s) for s in schedules.values())
    info = {"kind": "load", "config": asdict(config), "environment": describe_host(), "partial": True,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "context_window": window,
            "event_loop": event_loop(), "points": {}}
    endpoint, models = run_async(_prepare(config))
    info["server"] = {"models": models, "model": endpoint.model}
    atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2))
    written = 0
    bar = tqdm(total=planned, desc="load", unit="req", disable=not progress)
    with ResultsWriter(out / RESULTS, max_pending=MAX_UNSYNCED_RECORDS) as writer:
        def on_record(label: str):
            def write(record: dict) -> None:
                nonlocal written
                writer.append({"request_rate": label, **record})
                written += 1
                bar.update(1)
            return write

        try:
            for label, schedule in schedules.items():
                point = info["points"][label] = {"planned": len(schedule), "prompt_seed": prompt_seed(config, label)}
                with client_cpu(point):
                    metrics = run_async(_one_rate(config, endpoint, requests[label], schedule, on_record(label),
                                                    tokenizer))
                point["server_metrics"] = metrics
            info["partial"] = False
        finally:
            bar.close()
            info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2))
    return LoadOutcome(records=written, planned=planned, partial=info["partial"])


@contextlib.contextmanager
def client_cpu(point: dict):
    """Record in `point` the CPU time of this process (every thread: event loop, HTTP, tokenizer) over the block,
    and the share of one core it used: a client on the server's machine takes that much CPU from the server."""
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        point["client_cpu_s"] = cpu
        point["client_cpu_share"] = cpu / wall if wall > 0 else None


def prompt_seed(config: LoadConfig, label: str) -> int | None:
    """The workload seed of one rate: derived from (seed, rate), or the run's own with --same-prompts-each-rate
    (None for a .jsonl workload, whose prompts are the file's)."""
    if config.workload.kind.endswith(".jsonl"):
        return None
    if config.same_prompts_each_rate:
        return config.workload.seed
    digest = hashlib.blake2b(f"{config.workload.seed}/{label}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def rate_requests(config: LoadConfig, counts: dict[str, int], tokenizer: Tokenizer | None) -> dict[str, list[Request]]:
    """Each rate's requests. By default no rate re-sends another's prompts: generated workloads are seeded
    per rate, and a .jsonl file is dealt out in turn (it must hold enough conversations)."""
    if config.same_prompts_each_rate:
        shared = build_requests(config.workload, max(counts.values()), tokenizer)
        return {label: shared[:n] for label, n in counts.items()}
    if not config.workload.kind.endswith(".jsonl"):
        return {label: build_requests(replace(config.workload, seed=prompt_seed(config, label)), n, tokenizer)
                for label, n in counts.items()}
    total, available = sum(counts.values()), config.workload.natural_count
    if len(counts) > 1 and total > available:
        fit = available // len(counts)
        raise KvbenchError(f"{config.workload.kind} holds {available} conversations and {len(counts)} rates need "
                           f"{total} for each to send its own; give {f'--num-requests {fit} or ' if fit else ''}"
                           "--same-prompts-each-rate")
    dealt = iter(build_requests(config.workload, total, tokenizer))
    return {label: [replace(r, index=i) for i, r in enumerate(itertools.islice(dealt, n))] for label, n in counts.items()}


def fit_context(config: LoadConfig, requests: dict[str, list[Request]], schedules: dict[str, list[float]],
                tokenizer: Tokenizer | None) -> int | None:
    """Cut each rate's default count (in place) to the requests that fit the tokenizer's context window;
    refuse a count the user asked for that does not fit. Returns the window (None: unknown, nothing checked)."""
    window = context_window(tokenizer) if tokenizer is not None else None
    if window is None:
        return None
    asked = config.num_requests is not None or config.duration_s is not None
    for label, reqs in requests.items():
        fit = fitting_requests(reqs, tokenizer, window)
        if fit == len(reqs):
            continue
        if fit == 0 or asked:
            fix = f"give --num-requests {fit}" if fit else "give shorter prompts or fewer --output-tokens"
            raise KvbenchError(f"request {fit + 1} of the {config.workload.kind} workload does not fit the "
                               f"tokenizer's {window}-token context with {config.workload.output_tokens} output "
                               f"tokens; {fix}")
        requests[label], schedules[label] = reqs[:fit], schedules[label][:fit]
    return window


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
