"""How the `load` kind measures: one open-loop request rate against a server, records written as requests end.

Before anything is sent, every rate's requests are built and cut to the tokenizer's context window, and
the server is probed (its models, one short request); run.json keeps per rate the planned count, the
prompt seed, the client's CPU time and the server's Prometheus deltas.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import resource
import time
from dataclasses import replace

import httpx

from kvbench.bench.environment import describe_host
from kvbench.bench.runner import Emit, RunOptions
from kvbench.errors import KvbenchError
from kvbench.load.loadgen import event_loop, run_async, run_load
from kvbench.load.workers import run_load_workers
from kvbench.load.probe import check_server, served_models
from kvbench.load.prometheus import scrape, server_deltas
from kvbench.load.spec import LoadSpec, RatePoint
from kvbench.load.stream import Endpoint
from kvbench.workloads import Request, Tokenizer, build_requests
from kvbench.workloads.tokenizer import context_window, fitting_requests, load_tokenizer


# Records not yet fsynced at any moment: a crash loses at most these (Ctrl-C loses none). Writing in batches
# from a thread keeps the 3-13 ms of each fsync off the event loop that sends on schedule.
MAX_UNSYNCED_RECORDS = 256


class LoadSession:
    unit = "request"
    max_unsynced_records = MAX_UNSYNCED_RECORDS

    def __init__(self, spec: LoadSpec, options: RunOptions):
        self.spec = spec
        self.tokenizer = _tokenizer(spec)
        self.schedules = {p.key: spec.schedule(p.rate) for p in spec.points()}  # config errors before the probe
        self.requests = rate_requests(spec, {label: len(s) for label, s in self.schedules.items()}, self.tokenizer)
        self.window = fit_context(spec, self.requests, self.schedules, self.tokenizer)

    def environment(self) -> dict:
        return describe_host()

    def notes(self) -> list[str]:
        return []

    def records_per(self, point: RatePoint) -> int:
        return len(self.schedules[point.key])

    def check(self, todo: list[tuple[RatePoint, int]], measured: list[dict]) -> None:
        self.endpoint, self.models = run_async(_prepare(self.spec))

    def groups(self, points: list[RatePoint]) -> list[list[RatePoint]]:
        return [points]

    def open(self, group: list[RatePoint]) -> dict:
        return {"server": {"models": self.models, "model": self.endpoint.model, "context_window": self.window},
                "client": {"event_loop": event_loop()}}

    def warmup(self, group: list[RatePoint], emit: Emit) -> None:
        """None: the probe already sent one request, and a load run measures the server as it is."""

    def measure(self, point: RatePoint, trial: int, emit: Emit) -> dict:
        label = point.key

        def on_record(record: dict) -> None:
            emit({"point": label, "trial": trial, "request_rate": label, **record})

        facts = {"planned": len(self.schedules[label]), "prompt_seed": prompt_seed(self.spec, label)}
        with client_cpu(facts):
            facts["server_metrics"] = _one_rate(self.spec, self.endpoint, self.requests[label], self.schedules[label],
                                                on_record, self.tokenizer)
        return facts


@contextlib.contextmanager
def client_cpu(point: dict):
    """Record in `point` the CPU time of this process (every thread: event loop, HTTP, tokenizer) and of its worker
    processes over the block, and the share of one core it used: a client on the server's machine takes that
    much CPU from the server."""
    cpu, wall = _cpu_s(), time.perf_counter()
    try:
        yield
    finally:
        cpu, wall = _cpu_s() - cpu, time.perf_counter() - wall
        point["client_cpu_s"] = cpu
        point["client_cpu_share"] = cpu / wall if wall > 0 else None


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the load workers, joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def prompt_seed(spec: LoadSpec, label: str) -> int | None:
    """The workload seed of one rate: derived from (seed, rate), or the run's own with same_prompts_each_rate
    (None for a .jsonl workload, whose prompts are the file's)."""
    if spec.workload.kind.endswith(".jsonl"):
        return None
    if spec.same_prompts_each_rate:
        return spec.workload.seed
    digest = hashlib.blake2b(f"{spec.workload.seed}/{label}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def rate_requests(spec: LoadSpec, counts: dict[str, int], tokenizer: Tokenizer | None) -> dict[str, list[Request]]:
    """Each rate's requests. By default no rate re-sends another's prompts: generated workloads are seeded
    per rate, and a .jsonl file is dealt out in turn (it must hold enough conversations)."""
    if spec.same_prompts_each_rate:
        shared = build_requests(spec.workload, max(counts.values()), tokenizer, form="text")
        return {label: shared[:n] for label, n in counts.items()}
    if not spec.workload.kind.endswith(".jsonl"):
        return {label: build_requests(replace(spec.workload, seed=prompt_seed(spec, label)), n, tokenizer, form="text")
                for label, n in counts.items()}
    total, available = sum(counts.values()), spec.workload.natural_count
    if len(counts) > 1 and total > available:
        fit = available // len(counts)
        raise KvbenchError(f"{spec.workload.kind} holds {available} conversations and {len(counts)} rates need "
                           f"{total} for each to send its own; give {f'--num-requests {fit} or ' if fit else ''}"
                           "--same-prompts-each-rate")
    dealt = iter(build_requests(spec.workload, total, tokenizer, form="text"))
    return {label: [replace(r, index=i) for i, r in enumerate(itertools.islice(dealt, n))] for label, n in counts.items()}


def fit_context(spec: LoadSpec, requests: dict[str, list[Request]], schedules: dict[str, list[float]],
                tokenizer: Tokenizer | None) -> int | None:
    """Cut each rate's default count (in place) to the requests that fit the tokenizer's context window;
    refuse a count the user asked for that does not fit. Returns the window (None: unknown, nothing checked)."""
    window = context_window(tokenizer) if tokenizer is not None else None
    if window is None:
        return None
    asked = spec.num_requests is not None or spec.duration_s is not None
    for label, reqs in requests.items():
        fit = fitting_requests(reqs, tokenizer, window)
        if fit == len(reqs):
            continue
        if fit == 0 or asked:
            fix = f"give --num-requests {fit}" if fit else "give shorter prompts or fewer --output-tokens"
            raise KvbenchError(f"request {fit + 1} of the {spec.workload.kind} workload does not fit the "
                               f"tokenizer's {window}-token context with {spec.workload.output_tokens} output "
                               f"tokens; {fix}")
        requests[label], schedules[label] = reqs[:fit], schedules[label][:fit]
    return window


def _tokenizer(spec: LoadSpec) -> Tokenizer | None:
    if spec.tokenizer is not None:
        return load_tokenizer(spec.tokenizer)
    if spec.workload.needs_tokenizer:
        raise KvbenchError(f"the {spec.workload.kind} workload builds prompts with the served model's tokenizer; "
                           "give --tokenizer (a local model dir, a cached hub id, or smollm2-135m)")
    return None


async def _prepare(spec: LoadSpec) -> tuple[Endpoint, list[str] | None]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(min(spec.timeout_s, 30.0))) as client:
        models = await served_models(client, spec.url)
    model = spec.model
    if model is None:
        if not models or len(models) != 1:
            raise KvbenchError(f"give --model; the server lists {', '.join(models) if models else 'no models'}")
        model = models[0]
    endpoint = Endpoint(spec.url, model, spec.endpoint, spec.timeout_s, spec.ignore_eos)
    await check_server(endpoint, models)
    return endpoint, models


def _one_rate(spec: LoadSpec, endpoint: Endpoint, requests, schedule, on_record, tokenizer) -> dict:
    """Send one rate's requests (from `spec.workers` processes when more than one) between two scrapes of the
    server's metrics; returns their deltas."""
    before = run_async(_scrape(spec.url))
    if spec.workers > 1:
        run_load_workers(endpoint, requests, schedule, on_record, spec.max_concurrency, tokenizer, spec.workers)
    else:
        run_async(run_load(endpoint, requests, schedule, on_record, spec.max_concurrency, tokenizer))
    after = run_async(_scrape(spec.url)) if before is not None else None
    return server_deltas(before, after)


async def _scrape(url: str):
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        return await scrape(client, url)
