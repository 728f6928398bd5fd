"""Run a suite: every point, warmups first, one appended record per measured trial, resumable.

Data flows one way: spec -> workload prompts -> engine -> per-step timestamps -> metrics ->
records. The report reads only the records.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from kvbench.bench import preflight
from kvbench.bench.environment import describe
from kvbench.bench.metrics import request_timing
from kvbench.bench.records import RESULTS, RUN_INFO, ResultsWriter, atomic_write_text, read_records, repair
from kvbench.bench.spec import Point, SuiteSpec, to_dict
from kvbench.bench.workloads import build_prompts
from kvbench.engine import GenerationConfig, GenerationResult, generate
from kvbench.errors import KvbenchError
from kvbench.models import LoadedModel, load_model
from kvbench.strategies import build_strategy


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


def prepare_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".kvbench-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise KvbenchError(f"cannot write to output dir {out}: {exc.strerror or exc}; choose another --out") from None
    return out


def run_suite(spec: SuiteSpec, options: RunOptions, lm: LoadedModel | None = None) -> RunOutcome:
    out = prepare_out_dir(options.out)
    results_path = out / RESULTS
    if options.repair and results_path.exists():
        dropped = repair(results_path)
        print(f"kvbench: dropped {dropped} corrupt line(s) from {results_path}")
    existing: list[dict] = []
    if results_path.exists() and results_path.stat().st_size > 0:
        if not options.resume:
            raise KvbenchError(f"{out} already holds results; pass --resume to continue that run, or choose another --out")
        existing = read_records(results_path)
        _check_same_sweep(out, spec)

    lm = lm or load_model(spec.model, spec.device, spec.dtype)
    prompts = {p: _prompts_for(spec, lm, p) for p in spec.points()}
    worst = preflight.estimate(lm, spec, {p: max(len(x) for x in prompts[p]) for p in prompts})
    preflight.check(worst, options.memory_limit or preflight.default_limit(lm))

    notes = sorted({n for s in spec.strategies for n in build_strategy(s).notes(lm.device)})
    _write_run_info(out, spec, lm, worst, notes)
    done = {(r.get("point"), r.get("trial")) for r in existing if not r.get("warmup")}
    todo = [(p, t) for p in spec.points() for t in range(spec.trials) if (p.key, t) not in done]
    skipped = spec.trials * len(spec.points()) - len(todo)
    bar = tqdm(total=len(todo), desc=spec.name, unit="trial", disable=not options.progress)
    with ResultsWriter(results_path) as writer:
        for shape in _shapes(spec.points()):
            # Strategies of one shape take turns trial by trial, so drift of the machine (heat, other
            # load) spreads over all of them instead of biasing whichever ran last.
            pending = {p: [t for q, t in todo if q == p] for p in shape}
            pending = {p: ts for p, ts in pending.items() if ts}
            runs = {p: _PointRun(spec, lm, p, prompts[p]) for p in pending}
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
    bar.close()
    return RunOutcome(out, len(todo), skipped, tuple(notes))


class _PointRun:
    """Everything needed to measure one point again and again."""

    def __init__(self, spec: SuiteSpec, lm: LoadedModel, point: Point, prompts: list[list[int]]):
        self.spec, self.lm, self.point, self.prompts = spec, lm, point, prompts
        self.strategy = build_strategy(point.strategy)
        self.config = GenerationConfig(max_new_tokens=point.output_tokens, stop_at_eos=not spec.ignore_eos)

    def measure(self, trial: int, warmup: bool) -> dict:
        result = generate(self.lm, self.strategy, _batch(self.prompts, self.point.batch_size, trial), self.config)
        return _record(self.spec, self.lm, self.point, trial, result, warmup)


def _shapes(points: list[Point]) -> list[list[Point]]:
    """Points grouped by (prompt, output, batch), in sweep order: the strategies compared with each other."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.prompt_tokens, p.output_tokens, p.batch_size), []).append(p)
    return list(groups.values())


def _prompts_for(spec: SuiteSpec, lm: LoadedModel, point: Point) -> list[list[int]]:
    """The distinct prompts of a point: one per batch row, times the text prompts when given as written."""
    unique = len(spec.workload.prompts) if spec.workload.kind == "text" and point.prompt_tokens is None else 1
    return build_prompts(spec.workload, lm, point.prompt_tokens, point.batch_size * unique)


def _batch(prompts: list[list[int]], batch_size: int, trial: int) -> list[list[int]]:
    """Trial t takes the next `batch_size` prompts, cycling: N trials over a few unique prompts."""
    return [prompts[(trial * batch_size + i) % len(prompts)] for i in range(batch_size)]


def _record(spec: SuiteSpec, lm: LoadedModel, point: Point, trial: int, result: GenerationResult, warmup: bool) -> dict:
    timing = request_timing(result.step_times_s, result.batch_size)
    digest = hashlib.blake2b(json.dumps(result.tokens).encode(), digest_size=8).hexdigest()
    return {
        "suite": spec.name,
        "point": point.key,
        "strategy": point.strategy,
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "workload": spec.workload.kind,
        "trial": trial,
        "warmup": warmup,
        "prompt_tokens": max(result.prompt_lengths),
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


def _check_same_sweep(out: Path, spec: SuiteSpec) -> None:
    info_path = out / RUN_INFO
    if not info_path.exists():
        return
    previous = json.loads(info_path.read_text()).get("spec_digest")
    if previous and previous != spec.digest():
        raise KvbenchError(
            f"{out} holds results of a different sweep (spec changed since); resume with the same "
            "suite and flags, or choose another --out"
        )


def _write_run_info(out: Path, spec: SuiteSpec, lm: LoadedModel, worst: preflight.Estimate, notes: list[str]) -> None:
    info = {
        "suite": spec.name,
        "spec": to_dict(spec),
        "spec_digest": spec.digest(),
        "model": {"name": lm.name, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch."),
                  "weight_bytes": lm.weight_bytes, "context_window": lm.context_window},
        "environment": describe(lm.device),
        "preflight": {"largest_point": worst.point.key, "estimated_bytes": worst.total},
        "notes": notes,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2) + "\n")
