"""Run the reuse suites: sequences of requests against a fresh reuse cache, one record per request.

Cold requests are cold: every sequence gets a new, empty cache (and, for the disk tier, a new
directory), and the kernel warmup at model load uses no reuse cache at all. A sequence's records
are appended when it ends; a sequence a kill cut mid-way (some of its records written) is never
counted as done: on resume its records are dropped and it is measured again from its first request.
Hit figures are per request (`cached_tokens`), never cumulative.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvbench.bench import provenance
from kvbench.bench.environment import describe
from kvbench.bench.metrics import request_timing
from kvbench.bench.outlock import locked
from kvbench.bench.records import RESULTS, RUN_INFO, ResultsWriter, atomic_write_text, repair
from kvbench.bench.reuse_spec import STREAMS, ReusePoint, ReuseSuiteSpec, TrafficSuiteSpec, parse_mode
from kvbench.bench.runner import RunOptions, RunOutcome, prepare_out_dir
from kvbench.device import resolve_device
from kvbench.engine import GenerationConfig, GenerationResult, generate
from kvbench.engine.generate import check_prompts
from kvbench.engine.reuse import prefill_floor_ms
from kvbench.errors import KvbenchError
from kvbench.models import LoadedModel, load_model
from kvbench.reuse import ReuseCache, ReuseConfig
from kvbench.strategies import build_strategy
from kvbench.workloads import Request, WorkloadSpec, build_requests, for_model
from kvbench.workloads.corpus import Corpus
from kvbench.workloads.reuse import document_pool

_DISK_TIER = "kvbench-disk-tier-"


def run_reuse_suite(spec: ReuseSuiteSpec | TrafficSuiteSpec, options: RunOptions, lm: LoadedModel | None = None) -> RunOutcome:
    out = prepare_out_dir(options.out)
    with locked(out):
        return _run_reuse_suite(spec, options, lm, out)


def _run_reuse_suite(spec: ReuseSuiteSpec | TrafficSuiteSpec, options: RunOptions, lm: LoadedModel | None,
                     out: Path) -> RunOutcome:
    results_path = out / RESULTS
    environment = describe(resolve_device(spec.device))
    existing = provenance.start(out, spec.kind, options.resume, options.repair, spec.digest(), environment)
    lm = lm or load_model(spec.model, spec.device, spec.dtype)
    provenance.check_model(out, existing, lm.name, lm.fingerprint)
    measured = drop_cut_sequences(results_path, spec, existing.records)
    done = {(r["point"], r["trial"]) for r in measured}
    todo = [(p, t) for t in range(spec.trials) for p in spec.points() if (p.key, t) not in done]
    texts = Corpus(for_model(lm), spec.seed)
    references = {(r["workload"], r["trial"], r["request_index"]): r["output_ids"]
                  for r in measured if r["reuse_mode"] == "none"}
    measure = _ReuseSequences(spec, lm, references) if spec.kind == "reuse" else _TrafficStreams(spec, lm, texts)
    for point, trial in todo:  # every request fits the model, before anything is measured
        for request in measure.requests(point, trial):
            check_prompts(lm, [request.ids], spec.output_tokens)
    info = {"suite": spec.name, "kind": spec.kind, "spec": spec.to_dict(), "spec_digest": spec.digest(),
            "environment": environment,
            "models": {lm.name: {"fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch."),
                                 "weight_bytes": lm.weight_bytes}},
            "notes": [], "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    info["parts"] = provenance.parts(existing, info)
    atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2) + "\n")
    sweep_dead_disk_tiers()
    _warm_kernels(lm)
    with ResultsWriter(results_path) as writer, tqdm(total=len(todo), desc=spec.name, unit="seq",
                                                     disable=not options.progress) as bar:
        for point, trial in todo:
            bar.set_postfix_str(point.key)
            for record in measure(point, trial):
                writer.append(record)
            bar.update()
    return RunOutcome(out, len(todo), spec.trials * len(spec.points()) - len(todo), ())


def sequence_length(spec: ReuseSuiteSpec | TrafficSuiteSpec, workload: str) -> int:
    """Requests in one sequence of `workload` (a traffic suite: in one stream)."""
    return spec.turns if spec.kind == "reuse" and workload == "multi-turn" else spec.requests


def drop_cut_sequences(path: Path, spec: ReuseSuiteSpec | TrafficSuiteSpec, records: list[dict]) -> list[dict]:
    """The records of complete sequences (every request recorded); those of a sequence cut mid-way, or
    with a line deleted by hand, are dropped from `path`, so that it is measured again from its first
    request and the report never counts it twice."""
    lengths = {p.key: sequence_length(spec, p.workload) for p in spec.points()}
    requests = defaultdict(set)
    for r in records:
        requests[(r["point"], r["trial"])].add(r["request_index"])
    foreign = sorted({point for point, _ in requests if point not in lengths})
    if foreign:  # possible when run.json, and with it the spec digest, is gone
        raise KvbenchError(f"{path} holds records of points this suite does not have ({', '.join(foreign[:3])}); "
                           "resume with the suite and flags that wrote them, or choose another --out")
    cut = {key for key, indices in requests.items() if indices != set(range(lengths[key[0]]))}
    if not cut:
        return records
    dropped = repair(path, keep=lambda r: (r["point"], r["trial"]) not in cut)
    print(f"kvbench: dropped {dropped} record(s) of {len(cut)} sequence(s) cut mid-way; they are measured again "
          "from their first request")
    return [r for r in records if (r["point"], r["trial"]) not in cut]


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


def _warm_kernels(lm: LoadedModel) -> None:
    """One untimed generation without reuse, so first-call costs land on no measured request."""
    ids = list(range(16, 16 + 96))
    generate(lm, build_strategy("dynamic"), [ids], GenerationConfig(max_new_tokens=4, stop_at_eos=False))


def _base_record(spec, lm: LoadedModel, point: ReusePoint, trial: int, index: int, ids: list[int],
                 result: GenerationResult) -> dict:
    reuse_mode, recompute = parse_mode(point.mode)
    reuse = result.reuse
    return {
        "suite": spec.name, "point": point.key, "workload": point.workload, "reuse_mode": reuse_mode,
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
    return ReuseCache(lm, ReuseConfig(
        mode=reuse_mode, recompute=recompute or "none", block_size=spec.block_size, disk_dir=disk_dir,
        **{k: getattr(spec, k) for k in ("selective_tokens", "blend_fraction") if hasattr(spec, k)}, **extra,
    ))


class _ReuseSequences:
    def __init__(self, spec: ReuseSuiteSpec, lm, references: dict):
        self.spec, self.lm, self.references = spec, lm, references
        self.dynamic = build_strategy("dynamic")
        self.config = GenerationConfig(max_new_tokens=spec.output_tokens, stop_at_eos=False)

    def requests(self, point: ReusePoint, trial: int) -> list[Request]:
        workload = WorkloadSpec(kind=f"reuse:{point.workload}", seed=self.spec.seed,
                                output_tokens=self.spec.output_tokens)
        return build_requests(workload, sequence_length(self.spec, point.workload), for_model(self.lm), form="ids")

    def __call__(self, point: ReusePoint, trial: int) -> list[dict]:
        requests = self.requests(point, trial)
        if point.mode == "none":
            return [self._record(point, trial, i, r, generate(self.lm, self.dynamic, [r.ids], self.config))
                    for i, r in enumerate(requests)]
        with disk_tier_dir() as disk_dir:
            cache = _cache(self.lm, self.spec, point.mode, disk_dir if point.tier == "disk" else None)
            records = []
            for i, request in enumerate(requests):
                if point.tier == "disk":
                    cache.clear_ram()  # every hit then comes from disk
                result = generate(self.lm, self.dynamic, [request.ids], self.config, reuse=cache)
                record = self._record(point, trial, i, request, result)
                if point.mode == "prefix" and result.reuse.cached_tokens:
                    record["floor_ms"] = prefill_floor_ms(self.lm, request.ids, result.reuse.cached_tokens)
                records.append(record)
            return records

    def _record(self, point, trial, index, request, result) -> dict:
        record = _base_record(self.spec, self.lm, point, trial, index, request.ids, result)
        key = (point.workload, trial, index)
        if point.mode == "none":
            self.references[key] = result.tokens[0]
        reference = self.references.get(key)
        record.update(turn=request.turn, floor_ms=None,
                      greedy_match=None if reference is None else result.tokens[0] == reference)
        return record


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


class _TrafficStreams:
    """Each stream sends `requests` requests, a document of the pool plus a fresh question, in the
    stream's order; RAM holds `ram_documents` documents' worth of blocks, the disk tier the rest."""

    def __init__(self, spec: TrafficSuiteSpec, lm, texts):
        self.spec, self.lm, self.texts = spec, lm, texts
        self.pool = document_pool(texts, spec.documents, spec.document_tokens)
        self.dynamic = build_strategy("dynamic")
        self.config = GenerationConfig(max_new_tokens=spec.output_tokens, stop_at_eos=False)

    def requests(self, point: ReusePoint, trial: int) -> list[Request]:
        """In the stream's order: a document of the pool, then a fresh question."""
        return [Request(i, None, self.spec.output_tokens, ids=self._prompt(doc, trial, i))
                for i, doc in enumerate(stream_order(self.spec, point.workload, trial))]

    def _prompt(self, doc: int, trial: int, i: int) -> list[int]:
        return self.pool[doc] + self.texts.encode("\n\nQ: ") + self.texts.prose(8, 10_000 + 97 * trial + i)

    def __call__(self, point: ReusePoint, trial: int) -> list[dict]:
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
