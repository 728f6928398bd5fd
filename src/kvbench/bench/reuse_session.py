"""How the `reuse` and `traffic` kinds measure: sequences of requests against a fresh reuse cache.

Cold requests are cold: every sequence gets a new, empty cache (and, for the disk tier, a new
directory), and the kernel warmup at model load uses no reuse cache at all. One (point, trial) is a
whole sequence, one record per request; a sequence a kill cut mid-way is never counted as done (the
runner drops its records and measures it again from its first request). Hit figures are per request
(`cached_tokens`), never cumulative.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kvbench.bench import preflight
from kvbench.bench.environment import describe
from kvbench.bench.metrics import request_timing
from kvbench.bench.quality import distribution_agreement, greedy_agreement
from kvbench.bench.reuse_spec import STREAMS, ReusePoint, ReuseSuiteSpec, TrafficSuiteSpec, mode_budgets, parse_mode
from kvbench.bench.runner import Emit, RunOptions
from kvbench.bench.suite import Point, StrategyRef
from kvbench.device import resolve_device
from kvbench.engine import GenerationConfig, GenerationResult, generate
from kvbench.engine.generate import check_prompts
from kvbench.engine.prefill import prefill_floor_ms
from kvbench.engine.teacher import teacher_forced_logprobs
from kvbench.models import LoadedModel, load_model
from kvbench.reuse import ReuseCache, ReuseConfig
from kvbench.strategies import build_strategy
from kvbench.workloads import Request, WorkloadSpec, build_requests, for_model
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.reuse import document_pool

_DISK_TIER = "kvbench-disk-tier-"


class _SequenceSession:
    """What the reuse and traffic kinds share: one model, sequences of requests, one record per request."""

    unit = "request"
    max_unsynced_records = None

    def __init__(self, spec: ReuseSuiteSpec | TrafficSuiteSpec, options: RunOptions, lm: LoadedModel | None = None):
        self.spec, self.options, self.lm = spec, options, lm

    def environment(self) -> dict:
        return describe(self.lm.device if self.lm is not None else resolve_device(self.spec.device))

    def notes(self) -> list[str]:
        return []

    def records_per(self, point: ReusePoint) -> int:
        return sequence_length(self.spec, point.workload)

    def check(self, todo: list[tuple[ReusePoint, int]], measured: list[dict]) -> None:
        """Load the model, then refuse any request that does not fit its context, and a run whose longest request
        (with the blocks its sequence stores in RAM) would not fit in memory."""
        self.lm = self.lm or load_model(self.spec.model, self.spec.device, self.spec.dtype)
        self.texts = Corpus(for_model(self.lm), self.spec.seed)
        self._start(measured)
        longest, stored = 0, 0
        for point, trial in todo:
            requests = self.requests(point, trial)
            for request in requests:
                check_prompts(self.lm, [request.ids], self.spec.output_tokens)
            longest = max(longest, *(len(r.ids) for r in requests))
            stored = max(stored, sum(len(r.ids) for r in requests) * self.lm.kv_bytes_per_token)
        if todo:
            point = Point(self.lm.name, StrategyRef("dynamic"), longest, self.spec.output_tokens, 1)
            worst = preflight.estimate(preflight.ModelShape.of(self.lm), [point], {point: longest})
            worst = dataclasses.replace(worst, kv=worst.kv + min(stored, ReuseConfig().ram_bytes))
            limit = self.options.memory_limit
            preflight.check(worst, limit if limit is not None else preflight.default_limit(self.lm.weight_bytes))

    def groups(self, points: list[ReusePoint]) -> list[list[ReusePoint]]:
        return [points]

    def open(self, group: list[ReusePoint]) -> dict:
        lm = self.lm
        return {"models": {lm.name: {"fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch."),
                                     "weight_bytes": lm.weight_bytes}}}

    def warmup(self, group: list[ReusePoint], emit: Emit) -> None:
        """One untimed generation without reuse, so first-call costs land on no measured request."""
        sweep_dead_disk_tiers()
        ids = list(range(16, 16 + 96))
        generate(self.lm, build_strategy("dynamic"), [ids], GenerationConfig(max_new_tokens=4, stop_at_eos=False))

    def measure(self, point: ReusePoint, trial: int, emit: Emit) -> None:
        for record in self._sequence(point, trial):
            emit(record)


def sequence_length(spec: ReuseSuiteSpec | TrafficSuiteSpec, workload: str) -> int:
    """Requests in one sequence of `workload` (a traffic suite: in one stream)."""
    return spec.turns if spec.kind == "reuse" and workload == "multi-turn" else spec.requests


def disk_tier_dir() -> tempfile.TemporaryDirectory:
    """A fresh directory for one sequence's disk tier, named with this process's id: a run killed before
    it could remove it leaves a directory that `sweep_dead_disk_tiers` recognises as orphaned."""
    return tempfile.TemporaryDirectory(prefix=f"{_DISK_TIER}{os.getpid()}-")


def sweep_dead_disk_tiers(root: Path | None = None) -> None:
    """Remove the disk-tier directories whose run is gone (killed with SIGKILL: no `finally` ran)."""
    for path in Path(root or tempfile.gettempdir()).glob(f"{_DISK_TIER}*-*"):
        pid = path.name.removeprefix(_DISK_TIER).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _base_record(spec, lm: LoadedModel, point: ReusePoint, trial: int, index: int, ids: list[int],
                 result: GenerationResult) -> dict:
    reuse_mode, recompute = parse_mode(point.mode)
    reuse = result.reuse
    return {
        "suite": spec.name, "point": point.key, "workload": point.workload, "mode": point.mode, "reuse_mode": reuse_mode,
        "recompute": recompute, "tier": point.tier, "trial": trial, "warmup": False, "request_index": index,
        "model": lm.name, "model_fingerprint": lm.fingerprint, "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."), "prompt_tokens": len(ids),
        "output_tokens": result.output_tokens, "max_new_tokens": spec.output_tokens,
        **asdict(request_timing(result.step_times_s)),
        "cached_tokens": reuse.cached_tokens if reuse else 0,
        "reuse_ratio": reuse.reuse_ratio if reuse else 0.0,
        "exact_tokens": reuse.exact_tokens if reuse else 0,
        "recomputed_tokens": reuse.recomputed_tokens if reuse else 0,
        "computed_tokens": reuse.computed_tokens if reuse else len(ids),
        "tier_tokens": reuse.tier_tokens if reuse else {},
        "load_ms": reuse.load_ms if reuse else None,
        "kv_cache_bytes": result.kv_cache_bytes,
        "peak_mem_bytes": max(result.peak_mem_bytes.values()), "mem_kind": result.mem_kind,
        "output_ids": result.tokens[0], "time": time.time(),
    }


def _cache(lm, spec, mode: str, disk_dir: str | None, **extra) -> ReuseCache:
    reuse_mode, recompute = parse_mode(mode)
    budgets = {k: getattr(spec, k) for k in ("selective_tokens", "blend_fraction") if hasattr(spec, k)}
    return ReuseCache(lm, ReuseConfig(
        mode=reuse_mode, recompute=recompute or "none", block_size=spec.block_size, disk_dir=disk_dir,
        **{**budgets, **mode_budgets(mode)}, **extra,
    ))


class ReuseSession(_SequenceSession):
    """Mode `none` of a workload is measured before its reuse modes: it is the reference for greedy and
    teacher-forced agreement. A reuse request's teacher-forced pass runs just before it (untimed), against the
    store as the request finds it (afterwards the store holds the request's own blocks, exact hits)."""

    def _start(self, measured: list[dict]) -> None:
        self.references = {(r["workload"], r["trial"], r["request_index"]): r["output_ids"]
                           for r in measured if r["reuse_mode"] == "none"}
        self.reference_logprobs: dict[tuple, object] = {}
        self.tok = for_model(self.lm)
        self.dynamic = build_strategy("dynamic")
        self.config = GenerationConfig(max_new_tokens=self.spec.output_tokens, stop_at_eos=False)

    def requests(self, point: ReusePoint, trial: int) -> list[Request]:
        workload = WorkloadSpec(kind=f"reuse:{point.workload}", seed=self.spec.seed,
                                output_tokens=self.spec.output_tokens)
        return build_requests(workload, sequence_length(self.spec, point.workload), for_model(self.lm), form="ids")

    def _sequence(self, point: ReusePoint, trial: int) -> list[dict]:
        requests = self.requests(point, trial)
        if point.mode == "none":
            return [self._record(point, trial, i, r, generate(self.lm, self.dynamic, [r.ids], self.config), None)
                    for i, r in enumerate(requests)]
        with disk_tier_dir() as disk_dir:
            cache = _cache(self.lm, self.spec, point.mode, disk_dir if point.tier == "disk" else None)
            records = []
            for i, request in enumerate(requests):
                candidate = self._teacher_forced((point.workload, trial, i), request, cache)  # may promote to RAM
                if point.tier == "disk":
                    cache.clear_ram()  # every timed hit then comes from disk
                result = generate(self.lm, self.dynamic, [request.ids], self.config, reuse=cache)
                record = self._record(point, trial, i, request, result, candidate)
                if point.mode == "prefix" and result.reuse.cached_tokens:
                    record["floor_ms"] = prefill_floor_ms(self.lm, request.ids, result.reuse.cached_tokens)
                records.append(record)
            return records

    def _teacher_forced(self, key: tuple, request: Request, source: ReuseCache | None):
        """Log-probabilities over no reuse's greedy output, prefilled from `source` (None: no reuse, the
        reference itself, kept for the reuse modes); None without `teacher_forced` or a reference, and for the
        cold request 0 (nothing is reused there; the report's quality covers warm requests)."""
        reference = self.references.get(key)
        if not self.spec.teacher_forced or reference is None or key[2] == 0:
            return None
        if source is not None:
            return teacher_forced_logprobs(self.lm, self.dynamic, request.ids, reference, source)
        if key not in self.reference_logprobs:
            self.reference_logprobs[key] = teacher_forced_logprobs(self.lm, self.dynamic, request.ids, reference)
        return self.reference_logprobs[key]

    def _record(self, point, trial, index, request, result, candidate) -> dict:
        record = _base_record(self.spec, self.lm, point, trial, index, request.ids, result)
        key = (point.workload, trial, index)
        if point.mode == "none":
            self.references[key] = result.tokens[0]
            candidate = self._teacher_forced(key, request, None)
        reference = self.references.get(key)
        agreement = None if reference is None else greedy_agreement(reference, result.tokens[0])
        text = self.tok.decode(result.tokens[0], skip_special_tokens=True)
        record.update(turn=request.turn, floor_ms=None,
                      greedy_match=None if reference is None else result.tokens[0] == reference,
                      greedy_agreement=agreement and agreement.fraction,
                      first_divergence=agreement and agreement.first_divergence,
                      accuracy=request.score(text) if request.answers else None, output_text=text,
                      **self._distribution(key, request, candidate))
        return record

    def _distribution(self, key: tuple, request: Request, candidate) -> dict:
        if candidate is None:
            return {"top1_agreement": None, "kl_mean": None}
        agreement = distribution_agreement(self._teacher_forced(key, request, None), candidate)
        return {"top1_agreement": agreement.top1_agreement, "kl_mean": agreement.kl_mean}


def stream_order(s: TrafficSuiteSpec, stream: str, trial: int) -> list[int]:
    """The documents a stream sends, in order: uniform, Zipf(s) over document rank, or temporal
    locality (with chance `locality`, one of the last `window` distinct documents again)."""
    rng = np.random.default_rng([s.seed, trial, STREAMS.index(stream)])
    if stream == "uniform":
        return rng.integers(0, s.documents, s.requests).tolist()
    if stream == "zipf":
        weights = 1.0 / np.arange(1, s.documents + 1) ** s.zipf_s
        return rng.choice(s.documents, s.requests, p=weights / weights.sum()).tolist()
    order: list[int] = []
    for _ in range(s.requests):
        recent = list(dict.fromkeys(reversed(order)))[:s.window]
        order.append(int(rng.choice(recent)) if recent and rng.random() < s.locality else int(rng.integers(s.documents)))
    return order


def ram_budget(s: TrafficSuiteSpec, prompt_tokens: int, kv_bytes_per_token: int) -> int:
    """Bytes for exactly `ram_documents` requests' stored blocks: a request stores the full blocks of
    its prompt (the partial last block is never stored, so it must not be counted either)."""
    return int(s.ram_documents * (prompt_tokens // s.block_size)) * s.block_size * kv_bytes_per_token


class TrafficSession(_SequenceSession):
    """Each stream sends `requests` requests, a document of the pool plus a fresh question, in the
    stream's order; RAM holds `ram_documents` documents' worth of blocks, the disk tier the rest."""

    def _start(self, measured: list[dict]) -> None:
        self.pool = document_pool(self.texts, self.spec.documents, self.spec.document_tokens)
        self.dynamic = build_strategy("dynamic")
        self.config = GenerationConfig(max_new_tokens=self.spec.output_tokens, stop_at_eos=False)

    def requests(self, point: ReusePoint, trial: int) -> list[Request]:
        """In the stream's order: a document of the pool, then a fresh question."""
        return [Request(i, None, self.spec.output_tokens, ids=self._prompt(doc, trial, i))
                for i, doc in enumerate(stream_order(self.spec, point.workload, trial))]

    def _prompt(self, doc: int, trial: int, i: int) -> list[int]:
        return self.pool[doc] + self.texts.encode("\n\nQ: ") + self.texts.prose(8, 10_000 + 97 * trial + i)

    def _sequence(self, point: ReusePoint, trial: int) -> list[dict]:
        s = self.spec
        with disk_tier_dir() as disk_dir:
            ram = ram_budget(s, len(self._prompt(0, trial, 0)), self.lm.kv_bytes_per_token)
            cache = _cache(self.lm, s, "prefix", disk_dir if s.disk else None, ram_bytes=ram)
            records = []
            documents = stream_order(s, point.workload, trial)
            for i, (doc, request) in enumerate(zip(documents, self.requests(point, trial))):
                result = generate(self.lm, self.dynamic, [request.ids], self.config, reuse=cache)
                record = _base_record(s, self.lm, point, trial, i, request.ids, result)
                tiers = cache.stats()["tiers"]
                record.update(stream=point.workload, document=doc, hit=result.reuse.cached_tokens > 0,
                              ram_bytes=tiers["ram"]["bytes"], disk_bytes=tiers.get("disk", {}).get("bytes", 0),
                              evictions=tiers["ram"]["evictions"])
                records.append(record)
            return records
