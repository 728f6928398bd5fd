"""How the `suite` kind measures: one generation per (point, trial) on an in-process model.

Before any weights load, every model of the sweep is checked from its config (context, memory); once a
model is loaded, its real prompts are checked again (the engine's prompt checks, each strategy's cache
for each prompt length, memory with the real lengths), so a sweep is refused before its first
measurement, never at its hundredth point.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, replace

from kvbench.bench import preflight
from kvbench.bench.assess import Assessor
from kvbench.bench.environment import describe
from kvbench.bench.metrics import request_timing
from kvbench.bench.runner import Emit, RunOptions
from kvbench.bench.suite import Point, SuiteSpec
from kvbench.device import resolve_device, resolve_dtype
from kvbench.engine import GenerationConfig, GenerationResult, generate
from kvbench.engine.generate import check_prompts
from kvbench.models import LoadedModel, load_model
from kvbench.workloads import Request, build_requests, for_model


class SuiteSession:
    unit = "trial"
    max_unsynced_records = None

    def __init__(self, spec: SuiteSpec, options: RunOptions, lm: LoadedModel | None = None):
        """`lm`, when given, serves its own model spec instead of loading it (tests, notebooks)."""
        self.spec, self.options, self.held = spec, options, lm
        self.lm: LoadedModel | None = None
        self.assessor: Assessor | None = None
        self.prompts: dict[Point, list[Request]] = {}
        self.runs: dict[Point, _PointRun] = {}

    def environment(self) -> dict:
        return describe(self._device())

    def notes(self) -> list[str]:
        return sorted({n for s in self.spec.variants() for n in s.build().notes(self._device())})

    def records_per(self, point: Point) -> int:
        return 1

    def check(self, todo: list[tuple[Point, int]], measured: list[dict]) -> None:
        """Every model of the sweep, from its config, before any weights load."""
        points = list(dict.fromkeys(p for p, _ in todo))
        for point in points:
            point.strategy.build().check_batch(point.batch_size)
        dtype = resolve_dtype(self.spec.dtype, self._device())
        for model_name in self.spec.model_names():
            mine = [p for p in points if p.model == model_name]
            if not mine:
                continue
            held = self._held(model_name)
            shape = preflight.ModelShape.of(held) if held else preflight.read_shape(model_name, dtype)
            preflight.check_context(shape, mine)
            self._check_memory(shape, mine, {p: p.prompt_tokens or 0 for p in mine}, held)

    def groups(self, points: list[Point]) -> list[list[Point]]:
        """Per model, then per (prompt, output, batch): the strategies compared with each other."""
        groups: dict[tuple, list[Point]] = {}
        for p in points:
            groups.setdefault((p.model, p.prompt_tokens, p.output_tokens, p.batch_size), []).append(p)
        return list(groups.values())

    def open(self, group: list[Point]) -> dict:
        """A new model is loaded, then every point of it checked with its real prompts before the first measurement."""
        model_name = group[0].model
        if self.lm is None or self.lm.name != model_name:
            self.lm, self.prompts = None, {}
            self.runs.clear()
            gc.collect()
            lm = self.lm = self._held(model_name) or load_model(model_name, self.spec.device, self.spec.dtype)
            self.assessor = Assessor(lm) if self.spec.quality and not lm.is_synthetic else None
            points = [p for p in self.spec.points() if p.model == model_name]
            self.prompts = {p: _prompts_for(self.spec, lm, p) for p in points}
            _check_points(lm, points, self.prompts)
            self.worst = self._check_memory(preflight.ModelShape.of(lm), points,
                                            {p: max(len(x.ids) for x in self.prompts[p]) for p in points}, lm)
        self.runs = {p: _PointRun(self.spec, self.lm, p, self.prompts[p], self.assessor) for p in group}
        return {"models": {model_name: _model_info(self.lm, self.worst)}}

    def warmup(self, group: list[Point], emit: Emit) -> None:
        for point in group:
            for w in range(self.spec.warmup):
                emit(self.runs[point].measure(w, warmup=True))

    def measure(self, point: Point, trial: int, emit: Emit) -> None:
        emit(self.runs[point].measure(trial, warmup=False))

    def _device(self):
        return self.held.device if self.held is not None else resolve_device(self.spec.device)

    def _held(self, model_name: str) -> LoadedModel | None:
        return self.held if self.held is not None and self.held.name == model_name else None

    def _check_memory(self, shape: preflight.ModelShape, points: list[Point], prompt_tokens: dict[Point, int],
                      loaded: LoadedModel | None) -> preflight.Estimate:
        """The largest point's estimate, refused over --memory-limit (default: 80% of what is available, counting
        the weights `loaded` already holds as available to it)."""
        worst = preflight.estimate(shape, points, prompt_tokens)
        limit = self.options.memory_limit
        preflight.check(worst, limit if limit is not None else preflight.default_limit(loaded.weight_bytes if loaded else 0))
        return worst


def _check_points(lm: LoadedModel, points: list[Point], prompts: dict[Point, list[Request]]) -> None:
    """Refuse the group before its first measurement if any point would be refused when its turn came:
    the engine's prompt checks (context window, token ids) and the strategy's own cache for each prompt length."""
    for point in points:
        strategy = point.strategy.build()
        check_prompts(lm, [p.ids for p in prompts[point]], point.output_tokens)
        for length in sorted({len(p.ids) for p in prompts[point]}):
            strategy.make_cache(lm, point.batch_size, length, point.output_tokens)


class _PointRun:
    """Everything needed to measure one point again and again."""

    def __init__(self, spec: SuiteSpec, lm: LoadedModel, point: Point, prompts: list[Request], assessor: Assessor | None):
        self.spec, self.lm, self.point, self.prompts, self.assessor = spec, lm, point, prompts, assessor
        self.strategy = point.strategy.build()
        self.config = GenerationConfig(max_new_tokens=point.output_tokens, stop_at_eos=not spec.ignore_eos)

    def measure(self, trial: int, warmup: bool) -> dict:
        batch = _batch(self.prompts, self.point.batch_size, trial)
        result = generate(self.lm, self.strategy, [p.ids for p in batch], self.config)
        record = _record(self.spec, self.lm, self.point, self.strategy, trial, result, warmup)
        first = batch[0]
        if first.task is not None:
            record.update(task=first.task, depth=first.depth,
                          accuracy=sum(p.score(self.lm.decode(t)) for p, t in zip(batch, result.tokens)) / len(batch))
        if self.assessor is not None and not warmup:  # untimed: after the measurement
            record.update(self.assessor.greedy(first, self.config, result.tokens[0]))
            record.update(self.assessor.distribution(self.point.strategy.label, self.strategy, first, self.config))
        return record


def _prompts_for(spec: SuiteSpec, lm: LoadedModel, point: Point) -> list[Request]:
    """The distinct prompts of a point: one per batch row, times the workload's distinct prompts."""
    as_written = spec.workload.kind == "text" and point.prompt_tokens is None
    count = point.batch_size * (len(spec.workload.prompts) if as_written else spec.workload.distinct_prompts)
    workload = replace(spec.workload, prompt_tokens=point.prompt_tokens, output_tokens=point.output_tokens)
    return build_requests(workload, count, for_model(lm), form="ids")


def _batch(prompts: list[Request], batch_size: int, trial: int) -> list[Request]:
    """Trial t takes the next `batch_size` prompts, cycling: N trials over a few unique prompts."""
    return [prompts[(trial * batch_size + i) % len(prompts)] for i in range(batch_size)]


def _record(spec, lm, point, strategy, trial: int, result: GenerationResult, warmup: bool) -> dict:
    timing = request_timing(result.step_times_s, result.batch_size)
    digest = hashlib.blake2b(json.dumps(result.tokens).encode(), digest_size=8).hexdigest()
    return {
        "suite": spec.name,
        "point": point.key,
        "strategy": point.strategy.name,
        "strategy_label": point.strategy.label,
        "params": dict(point.strategy.params),
        "budget": getattr(strategy, "budget", None),
        "bits": getattr(strategy, "bits", None),
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "workload": spec.workload.kind,
        "trial": trial,
        "warmup": warmup,
        "prompt_tokens": max(result.prompt_lengths),
        "context_tokens": max(result.prompt_lengths),
        "target_prompt_tokens": point.prompt_tokens,
        "max_new_tokens": point.output_tokens,
        "output_tokens": result.output_tokens,
        "batch_size": result.batch_size,
        **asdict(timing),
        "kv_cache_bytes": result.kv_cache_bytes,
        "peak_mem_bytes": max(result.peak_mem_bytes.values()),
        "prefill_peak_mem_bytes": result.peak_mem_bytes.get("prefill"),
        "decode_peak_mem_bytes": result.peak_mem_bytes.get("decode"),
        "mem_kind": result.mem_kind,
        "output_digest": digest,
        "time": time.time(),
    }


def _model_info(lm: LoadedModel, worst: preflight.Estimate) -> dict:
    return {
        "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch."), "weight_bytes": lm.weight_bytes,
        "context_window": lm.context_window,
        "preflight": {"largest_point": worst.point.key, "estimated_bytes": worst.total},
    }
