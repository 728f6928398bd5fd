"""Run a suite: every point, warmups first, one appended record per measured trial, resumable.

Data flows one way: spec -> workload prompts -> engine -> per-step timestamps -> metrics ->
records. The report reads only the records.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from kvbench.bench import preflight, provenance
from kvbench.bench.assess import Assessor
from kvbench.bench.environment import describe
from kvbench.bench.metrics import request_timing
from kvbench.bench.outlock import locked, prepare_out_dir
from kvbench.bench.records import RESULTS, RUN_INFO, ResultsWriter, atomic_write_text
from kvbench.bench.spec import Point, SuiteSpec, to_dict
from kvbench.bench.workloads import Prompt, build_prompts
from kvbench.device import resolve_device, resolve_dtype
from kvbench.engine import GenerationConfig, GenerationResult, generate
from kvbench.engine.generate import check_prompts
from kvbench.errors import KvbenchError
from kvbench.models import LoadedModel, load_model


@dataclass(frozen=True)
class RunOptions:
    out: Path
    resume: bool = False
    repair: bool = False
    memory_limit: int | None = None  # bytes; None: 80% of available memory
    progress: bool = True


@dataclass(frozen=True)
class RunOutcome:
    out: Path
    measured: int
    skipped: int
    notes: tuple[str, ...]


def run_suite(spec: SuiteSpec, options: RunOptions, lm: LoadedModel | None = None) -> RunOutcome:
    """Measure every point not yet in OUT/results.jsonl. `lm`, when given, serves its own model spec."""
    out = prepare_out_dir(options.out)
    with locked(out):
        return _run_suite(spec, options, lm, out)


def _run_suite(spec: SuiteSpec, options: RunOptions, lm: LoadedModel | None, out: Path) -> RunOutcome:
    results_path = out / RESULTS
    notes = sorted({n for s in spec.variants() for n in s.build().notes(_device_hint(lm, spec))})
    info = _run_info(spec, notes)
    existing = provenance.start(out, "suite", options.resume, options.repair, spec.digest(), info["environment"])
    info["models"] = dict(existing.info.get("models", {}))  # keep what earlier parts learnt about their models
    info["parts"] = provenance.parts(existing, info)
    all_points = spec.points()
    for point in all_points:  # before any model loads
        point.strategy.build().check_batch(point.batch_size)
    done = {(r.get("point"), r.get("trial")) for r in existing.records if not r.get("warmup")}
    todo = [(p, t) for p in all_points for t in range(spec.trials) if (p.key, t) not in done]
    unfinished = {p for p, _ in todo}
    to_load = {m: [p for p in all_points if p.model == m] for m in spec.model_names()}
    to_load = {m: points for m, points in to_load.items() if not unfinished.isdisjoint(points)}
    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    for model_name, points in to_load.items():  # every model, from its config, before any weights load
        held = lm if _serves(lm, model_name) else None
        shape = preflight.ModelShape.of(held) if held else preflight.read_shape(model_name, dtype)
        preflight.check_context(shape, points)
        _check_memory(shape, points, {p: p.prompt_tokens or 0 for p in points}, options, held)
    bar = tqdm(total=len(todo), desc=spec.name, unit="trial", disable=not options.progress)
    with ResultsWriter(results_path) as writer:
        for model_name, points in to_load.items():
            model = lm if _serves(lm, model_name) else load_model(model_name, spec.device, spec.dtype)
            provenance.check_model(out, existing, model_name, model.fingerprint)
            prompts = {p: _prompts_for(spec, model, p) for p in points}
            _check_points(model, points, prompts)
            worst = _check_memory(preflight.ModelShape.of(model), points,
                                  {p: max(len(x.ids) for x in prompts[p]) for p in points}, options, model)
            info["models"][model_name] = _model_info(model, worst)
            atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2) + "\n")
            _measure_model(spec, model, points, prompts, todo, writer, bar)
            del model
            gc.collect()
    bar.close()
    skipped = spec.trials * len(all_points) - len(todo)
    return RunOutcome(out, len(todo), skipped, tuple(notes))


def _serves(lm: LoadedModel | None, model_name: str) -> bool:
    return lm is not None and lm.name == model_name


def _check_memory(shape: preflight.ModelShape, points: list[Point], prompt_tokens: dict[Point, int],
                  options: RunOptions, loaded: LoadedModel | None) -> preflight.Estimate:
    """The largest point's estimate, refused over --memory-limit (default: 80% of what is available, counting
    the weights `loaded` already holds as available to it)."""
    worst = preflight.estimate(shape, points, prompt_tokens)
    limit = options.memory_limit
    preflight.check(worst, limit if limit is not None else preflight.default_limit(loaded.weight_bytes if loaded else 0))
    return worst


def _check_points(lm: LoadedModel, points: list[Point], prompts: dict[Point, list[Prompt]]) -> None:
    """Refuse the sweep before its first measurement if any point would be refused when its turn came:
    the engine's prompt checks (context window, token ids) and the strategy's own cache for each prompt length."""
    for point in points:
        strategy = point.strategy.build()
        check_prompts(lm, [p.ids for p in prompts[point]], point.output_tokens)
        for length in sorted({len(p.ids) for p in prompts[point]}):
            strategy.make_cache(lm, point.batch_size, length, point.output_tokens)


def _measure_model(spec, lm, points, prompts, todo, writer, bar) -> None:
    assessor = Assessor(lm) if spec.quality and not lm.is_synthetic else None
    for shape in _shapes(points):
        # Strategies of one shape take turns trial by trial, so drift of the machine (heat, other
        # load) spreads over all of them instead of biasing whichever ran last.
        pending = {p: [t for q, t in todo if q == p] for p in shape}
        runs = {p: _PointRun(spec, lm, p, prompts[p], assessor) for p, ts in pending.items() if ts}
        for point, run in runs.items():
            bar.set_postfix_str(f"warmup {point.key}")
            for w in range(spec.warmup):
                writer.append(run.measure(w, warmup=True))
        for trial in range(spec.trials):
            for point, run in runs.items():
                if trial in pending[point]:
                    bar.set_postfix_str(point.key)
                    writer.append(run.measure(trial, warmup=False))
                    bar.update()


class _PointRun:
    """Everything needed to measure one point again and again."""

    def __init__(self, spec: SuiteSpec, lm: LoadedModel, point: Point, prompts: list[Prompt], assessor: Assessor | None):
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


def _shapes(points: list[Point]) -> list[list[Point]]:
    """Points grouped by (prompt, output, batch), in sweep order: the strategies compared with each other."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.prompt_tokens, p.output_tokens, p.batch_size), []).append(p)
    return list(groups.values())


def _prompts_for(spec: SuiteSpec, lm: LoadedModel, point: Point) -> list[Prompt]:
    """The distinct prompts of a point: one per batch row, times the workload's distinct prompts."""
    as_written = spec.workload.kind == "text" and point.prompt_tokens is None
    count = point.batch_size * (len(spec.workload.prompts) if as_written else spec.workload.distinct_prompts)
    continuation = point.output_tokens if spec.quality else 0
    return build_prompts(spec.workload, lm, point.prompt_tokens, count, continuation)


def _batch(prompts: list[Prompt], batch_size: int, trial: int) -> list[Prompt]:
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


def _device_hint(lm: LoadedModel | None, spec: SuiteSpec):
    return lm.device if lm is not None else resolve_device(spec.device)


def _run_info(spec: SuiteSpec, notes: list[str]) -> dict:
    return {
        "suite": spec.name,
        "spec": to_dict(spec),
        "spec_digest": spec.digest(),
        "environment": describe(resolve_device(spec.device)),
        "models": {},
        "notes": notes,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _model_info(lm: LoadedModel, worst: preflight.Estimate) -> dict:
    return {
        "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch."), "weight_bytes": lm.weight_bytes,
        "context_window": lm.context_window,
        "preflight": {"largest_point": worst.point.key, "estimated_bytes": worst.total},
    }
