"""How the `serve` kind measures: one arrival schedule through a fresh `kvbench.serve.Engine` per (point, trial).

The model loads once; every trial builds a new engine (a new, empty pool: trials are independent and no
prefix cache carries over), adds every request with its scheduled arrival on the engine clock, and runs
until idle. Records carry the fields of a `kvbench load` record, timed from the scheduled arrival (the
virtual client sends on time: `sent_s = scheduled_s`, `send_lag_ms = 0`), so queueing behind a busy
engine shows in TTFT and E2E. Every request of every point is the same: prompts are built once, and each
record carries its prompt's digest and its output token ids, so the report compares engines' outputs on
the same requests (and refuses where the prompts differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict

from kvbench.bench import preflight
from kvbench.bench.environment import describe
from kvbench.bench.metrics import request_timing
from kvbench.bench.runner import Emit, RunOptions
from kvbench.bench.serve_spec import ServePoint, ServeSpec
from kvbench.bench.steps import STEPS, append_steps, keep_steps
from kvbench.bench.suite import Point, StrategyRef
from kvbench.device import resolve_device
from kvbench.models import LoadedModel, load_model
from kvbench.serve import Engine, EngineConfig, FinishReason, SamplingParams
from kvbench.serve.config import DEFAULT_KV_CACHE_MEMORY
from kvbench.serve.engine import StepStats
from kvbench.serve.kv import block_tokens
from kvbench.serve.per_seq import strategy_of
from kvbench.workloads import Request, build_requests, for_model

WARMUP_CONFIG = EngineConfig(num_blocks=16, max_model_len=256)  # the untimed run before a group's first trial


@dataclasses.dataclass(frozen=True)
class Planned:
    """One request of a point's schedule."""

    index: int
    stream: str
    offset_s: float  # scheduled arrival, seconds after the first
    request: Request


class ServeSession:
    unit = "request"
    max_unsynced_records = None  # records are written after the trial's engine ran: fsyncs time nothing

    def __init__(self, spec: ServeSpec, options: RunOptions, lm: LoadedModel | None = None):
        """`lm`, when given, serves its own model spec instead of loading it (tests, notebooks)."""
        self.spec, self.options, self.lm = spec, options, lm
        self.requests: list[Request] = []  # every point's, in schedule order: the main workload's, then each stream's

    def environment(self) -> dict:
        return describe(self.lm.device if self.lm is not None else resolve_device(self.spec.device))

    def notes(self) -> list[str]:
        """What the engines' strategies say of this device (offload and fetch on a CPU move bytes host-to-host)."""
        device = self.lm.device if self.lm is not None else resolve_device(self.spec.device)
        variants = [v for v in self.spec.variants() if v.config.strategy]
        return sorted({note for v in variants for note in strategy_of(v.config).notes(device)})

    def records_per(self, point: ServePoint) -> int:
        return len(self.spec.schedule(point.rate))

    def check(self, todo: list[tuple[ServePoint, int]], measured: list[dict]) -> None:
        """Drop the steps of cut trials; load the model and build the requests; refuse a run whose largest pool
        (with the weights and the longest prefill) is over --memory-limit, then any request an engine would refuse."""
        keep_steps(self.options.out / STEPS, {(r["point"], r["trial"]) for r in measured if not r.get("warmup")})
        self.lm = self.lm or load_model(self.spec.model, self.spec.device, self.spec.dtype)
        self.requests = self._requests()
        if not todo:
            return
        engines = list(dict.fromkeys(p.engine for p, _ in todo))
        longest = max(len(r.ids) for r in self.requests)
        point = Point(self.lm.name, StrategyRef("dynamic"), longest, 1, 1)  # the longest prefill's activations
        worst = preflight.estimate(preflight.ModelShape.of(self.lm), [point], {point: longest})
        worst = dataclasses.replace(worst, kv=max(pool_bytes_bound(e.config, self.lm, self.requests) for e in engines))
        limit = self.options.memory_limit
        preflight.check(worst, limit if limit is not None else preflight.default_limit(self.lm.weight_bytes))
        for variant in engines:  # the engine's own checks (context, pool size), before anything is measured
            engine = Engine(self.lm, variant.config)
            for request in self.requests:
                engine.add_request(request.ids, self._params(request))
            del engine

    def groups(self, points: list[ServePoint]) -> list[list[ServePoint]]:
        return [points]

    def open(self, group: list[ServePoint]) -> dict:
        lm = self.lm
        return {"models": {lm.name: {"fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch."),
                                     "weight_bytes": lm.weight_bytes, "context_window": lm.context_window}}}

    def warmup(self, group: list[ServePoint], emit: Emit) -> None:
        """A short untimed engine run (first-call costs), then `warmup` whole untimed trials per point, whose
        records carry warmup=True (their steps are not kept)."""
        Engine(self.lm, WARMUP_CONFIG).generate([list(range(16, 48))] * 2, SamplingParams(max_tokens=4, ignore_eos=True))
        for point in group:
            for w in range(self.spec.warmup):
                for record in self._serve(point, w, warmup=True)[1]:
                    emit(record)

    def measure(self, point: ServePoint, trial: int, emit: Emit) -> dict:
        engine, records = self._serve(point, trial, warmup=False)
        for record in records:
            emit(record)
        pool = engine.kv.pool
        return {"requests": len(records), "kv_pool_bytes": pool.num_blocks * pool.block_size * pool.token_bytes,
                "kv_pool_blocks": pool.num_blocks, "block_size": pool.block_size,
                "max_model_len": engine.kv.max_model_len}

    def _requests(self) -> list[Request]:
        tok, spec = for_model(self.lm), self.spec
        requests = build_requests(spec.workload, spec.main_count(), tok, form="ids")
        for stream in spec.streams:
            requests += build_requests(stream.workload, stream.num_requests, tok, form="ids")
        return requests

    def _params(self, request: Request) -> SamplingParams:
        return SamplingParams(max_tokens=request.max_tokens, ignore_eos=self.spec.ignore_eos)

    def _serve(self, point: ServePoint, trial: int, warmup: bool) -> tuple[Engine, list[dict]]:
        """Run the point's schedule once; write its steps (measured trials), return its records."""
        engine = Engine(self.lm, point.engine.config)
        plan = [Planned(i, tag, offset, r)
                for i, ((tag, offset), r) in enumerate(zip(self.spec.schedule(point.rate), self.requests))]
        t0 = engine.now()
        ids = [engine.add_request(p.request.ids, self._params(p.request), arrival_s=t0 + p.offset_s) for p in plan]
        engine.run_until_idle()
        base = {"point": point.key, "trial": trial, "warmup": warmup, **point.fields()}
        if not warmup:
            append_steps(self.options.out / STEPS, ({**base, **step_record(s, t0)} for s in engine.step_log))
        tok = for_model(self.lm)
        records = [{**base, **request_record(engine.requests[i], p, t0), **task_score(engine.requests[i], p, tok)}
                   for i, p in zip(ids, plan)]
        return engine, records


def step_record(step: StepStats, t0: float) -> dict:
    return {**asdict(step), "t_s": step.t_s - t0, "step_ms": step.step_ms}


def request_record(request, planned: Planned, t0: float) -> dict:
    """A `kvbench load` record (`load.stream.Trace.record`'s fields) from the request's timeline, with the engine's
    queue_ms (scheduled arrival -> start of the step that first ran it) and prefill_ms (that -> first token)."""
    line = request.timeline
    timing = request_timing(line.token_s, start_s=line.arrival_s, end_s=line.end_s, scheduled_s=line.arrival_s,
                            first_scheduled_s=line.first_scheduled_s)
    req = planned.request
    return {
        "index": planned.index, "stream": planned.stream, "scheduled_s": planned.offset_s, "sent_s": planned.offset_s,
        "end_s": line.end_s - t0, **asdict(timing),
        "prompt_tokens": len(request.prompt_ids), "output_tokens": len(request.output_ids),
        "max_tokens": request.params.max_tokens, "cached_tokens": request.num_cached or 0,
        "tier_tokens": dict(request.num_cached_by_tier or {}),
        "usage_source": "engine", "output_tokens_by": "engine",
        "status": "ok" if request.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) else "aborted",
        "error": None, "finish_reason": request.finish_reason.value, "preemptions": request.preemptions,
        "preempted_tokens": request.preempted_tokens, "swaps": request.swaps, "swap_refused": request.swap_refused,
        "bytes_swapped": request.bytes_swapped, "bytes_moved": request.bytes_moved,
        "prompt_digest": prompt_digest(request.prompt_ids), "output_ids": list(request.output_ids),
        "prefix_id": req.prefix_id, "shared_prefix": req.shared_prefix, "turn": req.turn, "time": time.time(),
    }


def task_score(request, planned: Planned, tok) -> dict:
    """The output's task accuracy where the workload knows the answers (needle: 1.0 when every answer is in
    the decoded output), else None."""
    answers = planned.request.answers
    if not answers:
        return {"accuracy": None}
    return {"accuracy": planned.request.score(tok.decode(list(request.output_ids), skip_special_tokens=True))}


def prompt_digest(ids: list[int]) -> str:
    """A request's prompt, as 16 hex digits of blake2b over its token ids."""
    return hashlib.blake2b(b"".join(i.to_bytes(4, "little") for i in ids), digest_size=8).hexdigest()


def pool_bytes_bound(config: EngineConfig, lm: LoadedModel, requests: Sequence[Request] = ()) -> int:
    """At least the bytes of the pool `config` allocates for `lm` (kvbench.serve.kv.make_kv rounds
    kv_cache_memory down to whole blocks). per_seq allocates no pool: its caches hold at most the cap, and
    at most every request's prompt + max_tokens at its strategy's bound per token."""
    cap = config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
    if config.kv_backend == "per_seq" and requests:
        per_token = strategy_of(config).token_bytes_bound(lm)
        return min(cap, sum(len(r.ids) + r.max_tokens for r in requests) * per_token)
    if config.num_blocks is None:
        if config.kv_backend == "paged" and config.strategy and strategy_of(config).name == "quantized":
            return 2 * cap  # float blocks for the whole cap, and an arena of quantized blocks as large
        return cap + (config.kv_host_memory or 0)  # a host tier holds the pool: the cap bounds the device part
    return config.num_blocks * block_tokens(config, lm.context_window) * lm.kv_bytes_per_token
