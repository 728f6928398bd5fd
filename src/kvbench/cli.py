"""The `kvbench` command: env, list, generate, run, report, load."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from kvbench.load.run import LoadConfig


# The commands whose flags take their choices and defaults from modules that import torch; the parser builds
# those flags only when one of them runs, so `kvbench load` and `kvbench report` never import torch.
ENGINE_FLAGS = ("generate", "run")
# A module the command needs and the install lacks -> the extra that installs it (`kvbench load` needs only the
# tokenizer's; every other command that fails this way runs models).
EXTRAS = {"load": "load"}


def _defaults():
    from kvbench.engine import GenerationConfig, SamplingConfig

    return GenerationConfig(), SamplingConfig()


def build_parser(engine_flags: bool = True) -> argparse.ArgumentParser:
    """The whole CLI; with engine_flags=False, `generate` and `run` are listed without their flags (torch-free)."""
    parser = argparse.ArgumentParser(prog="kvbench", description="KV-cache strategies for transformer inference, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="device and library check")
    sub.add_parser("list", help="models, strategies and suites")
    g = sub.add_parser("generate", help="sanity generation with timings")
    r = sub.add_parser("run", help="run a suite (a shipped name or a .yaml path) and write its report")
    if engine_flags:
        _engine_flags(g, r)
    rep = sub.add_parser("report", help="write OUT/report.md and OUT/figures from a run's results")
    rep.add_argument("out", type=Path)
    _load_parser(sub)
    return parser


def _engine_flags(g: argparse.ArgumentParser, r: argparse.ArgumentParser) -> None:
    from kvbench.device import DEVICES, DTYPES
    from kvbench.models import EMBEDDED
    from kvbench.strategies import STRATEGIES

    gen, sampling = _defaults()

    def model_args(p, default_model):
        p.add_argument("--model", default=default_model,
                       help=f"{EMBEDDED} (embedded default), synthetic:<tiny|135m|1b>, a local dir, a .gguf file or a hub id")
        p.add_argument("--device", choices=DEVICES, default=None if default_model is None else "auto")
        p.add_argument("--dtype", choices=list(DTYPES), default=None if default_model is None else "auto")

    g.add_argument("prompt")
    model_args(g, EMBEDDED)
    g.add_argument("--strategy", default="dynamic",
                   help=f"one of {', '.join(STRATEGIES.names())}, with parameters as name:key=value (e.g. h2o:budget=0.25)")
    g.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens)
    g.add_argument("--temperature", type=float, default=sampling.temperature, help="0 is greedy; otherwise at least 0.001")
    g.add_argument("--top-k", type=int, default=sampling.top_k)
    g.add_argument("--top-p", type=float, default=sampling.top_p)
    g.add_argument("--seed", type=int, default=sampling.seed)
    g.add_argument("--no-chat", action="store_true", help="send the prompt without the chat template")

    r.add_argument("suite")
    model_args(r, None)
    r.add_argument("--quick", action="store_true", help="the suite's small version (under 2 minutes on a laptop CPU)")
    r.add_argument("--trials", type=int)
    r.add_argument("--warmup", type=int)
    r.add_argument("--strategies", help="comma-separated, replaces the suite's list (name or name:key=value:...)")
    r.add_argument("--out", type=Path, help="output dir (default results/SUITE)")
    r.add_argument("--resume", action="store_true", help="skip trials already in OUT/results.jsonl")
    r.add_argument("--repair", action="store_true", help="drop corrupt lines of OUT/results.jsonl first")
    r.add_argument("--memory-limit", help="refuse sweeps estimated above this (e.g. 8GB); default 80%% of available")
    r.add_argument("--dry-run", action="store_true", help="list the points and exit")
    r.add_argument("--no-progress", action="store_true")


def _load_parser(sub) -> None:
    from kvbench.load.run import LoadConfig
    from kvbench.load.stream import ENDPOINTS
    from kvbench.load.workloads import KINDS, LoadWorkload

    cfg, wl = LoadConfig(url="http://x"), LoadWorkload()
    ld = sub.add_parser("load", help="open-loop load against an OpenAI-compatible server (vLLM, SGLang, llama.cpp, ...)")
    ld.add_argument("--url", required=True, help="the API root, e.g. http://127.0.0.1:8000/v1")
    ld.add_argument("--model", default=cfg.model, help="served model name (default: the one the server lists)")
    ld.add_argument("--endpoint", choices=ENDPOINTS, default=cfg.endpoint)
    ld.add_argument("--workload", default=wl.kind, help=f"{', '.join(KINDS)}, reuse:<reuse suite workload> (reuse:rag-prefix-2000), or a .jsonl file of conversations")
    ld.add_argument("--tokenizer", default=cfg.tokenizer,
                    help="the served model's tokenizer (local dir, cached hub id, smollm2-135m); builds the generated "
                         "workloads and counts tokens when the server reports no usage")
    rate = ld.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", default="inf", help="requests/s, or inf to send all at once")
    rate.add_argument("--request-rates", help="comma-separated rates for a latency-vs-load sweep, e.g. 1,2,4,inf")
    ld.add_argument("--same-prompts-each-rate", action="store_true",
                    help="send every rate the same prompts (default: each its own, seeded by rate, so a server's "
                         "prefix cache is not warm from the rates before)")
    ld.add_argument("--burstiness", type=float, default=cfg.burstiness, help="gamma shape: 1 Poisson, < 1 burstier")
    ld.add_argument("--max-concurrency", type=int, default=cfg.max_concurrency)
    count = ld.add_mutually_exclusive_group()
    count.add_argument("--num-requests", type=int, default=cfg.num_requests,
                       help="default: one pass over the workload, or 50 random prompts")
    count.add_argument("--duration", type=float, default=cfg.duration_s, help="seconds of arrivals (finite rate)")
    ld.add_argument("--prompt-tokens", type=int, default=wl.prompt_tokens)
    ld.add_argument("--output-tokens", type=int, default=wl.output_tokens, help="max_tokens of each request")
    ld.add_argument("--prefix-tokens", type=int, default=wl.prefix_tokens, help="prefix-repetition")
    ld.add_argument("--prefixes", type=int, default=wl.prefixes, help="prefix-repetition: distinct prefixes")
    ld.add_argument("--suffixes", type=int, default=wl.suffixes, help="prefix-repetition: requests per prefix")
    ld.add_argument("--conversations", type=int, default=wl.conversations, help="multi-turn")
    ld.add_argument("--turns", type=int, default=wl.turns, help="multi-turn")
    ld.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-tokens (vLLM, SGLang)")
    ld.add_argument("--slo", help="goodput limits in ms, e.g. ttft_ms=200,tpot_ms=50 (keys: ttft_ms, tpot_ms, e2e_ms)")
    ld.add_argument("--timeout", type=float, default=cfg.timeout_s, help="seconds without data before a request fails")
    ld.add_argument("--max-error-rate", type=float, default=cfg.max_error_rate,
                    help="exit 1 when the share of failed requests at any rate is above this (e.g. 0.05); the "
                         "records and report are written either way")
    ld.add_argument("--seed", type=int, default=cfg.seed)
    ld.add_argument("--out", type=Path, help="output dir (default results/load)")
    ld.add_argument("--no-progress", action="store_true")


def _one_line_warnings() -> None:
    """Print kvbench's own warnings (an untested dependency version) as one line each, not Python's two."""
    import warnings

    from kvbench.versions import UntestedVersionWarning

    default = warnings.showwarning
    if getattr(default, "one_line_for_kvbench", False):  # already installed (main called again in-process)
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UntestedVersionWarning):
            print(f"kvbench: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show.one_line_for_kvbench = True
    warnings.showwarning = show


def _interrupted(args: argparse.Namespace | None) -> str:
    """What an interrupted command kept and how to go on: only `run` has --resume."""
    command = getattr(args, "command", None)
    if command == "run":
        return "kvbench: interrupted; every record already measured is kept (rerun with --resume)"
    if command == "load":
        out = args.out or Path("results") / "load"
        return f"kvbench: interrupted; the requests already measured are kept in {out}; `kvbench report {out}` " \
               "writes their report"
    return "kvbench: interrupted"


def main(argv: list[str] | None = None) -> int:
    _one_line_warnings()
    args = None
    command = _command(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(engine_flags=command in ENGINE_FLAGS).parse_args(argv)
        return {"env": cmd_env, "list": cmd_list, "generate": cmd_generate, "run": cmd_run, "report": cmd_report,
                "load": cmd_load}[args.command](args)
    except KvbenchError as exc:
        print(f"kvbench: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] == "kvbench":
            raise  # a broken kvbench install, not a missing extra
        extra = EXTRAS.get(command, "engine")
        print(f"kvbench: error: kvbench {command} needs {exc.name.partition('.')[0]}, which is not installed; "
              f"install it with pip install 'kvbench[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _command(argv: list[str]) -> str | None:
    """The subcommand about to run: the first word that is not an option (kvbench has no global options)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _quiet_transformers() -> None:
    # set before the first import: without torch, importing transformers prints advice that models are unavailable
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def cmd_env(args) -> int:
    import platform

    import torch
    import transformers

    from kvbench.device import resolve_device
    from kvbench.models import EMBEDDED, cache_root, embedded_gguf

    from kvbench.versions import tested_ranges, untested

    ranges = tested_ranges()
    print(f"python        {platform.python_version()} ({platform.platform()})")
    print(f"torch         {torch.__version__} ({torch.get_num_threads()} threads; tested {ranges.get('torch', 'unknown')})")
    print(f"transformers  {transformers.__version__} (tested {ranges.get('transformers', 'unknown')})")
    for line in untested():
        print(f"warning       {line}")
    print(f"cuda          {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    print(f"mps           {torch.backends.mps.is_available()}")
    device = resolve_device("auto")
    x = torch.randn(256, 256, device=device)
    ok = torch.allclose((x @ torch.eye(256, device=device)).cpu(), x.cpu())
    print(f"auto device   {device} (matmul check {'ok' if ok else 'FAILED'})")
    try:
        print(f"embedded      {EMBEDDED}: {embedded_gguf()}")
    except KvbenchError as exc:
        print(f"embedded      missing: {exc}")
    print(f"cache dir     {cache_root()}")
    return 0 if ok else 1


def cmd_list(args) -> int:
    import dataclasses

    from kvbench.bench.spec import load_suite, suite_names
    from kvbench.models import known_models
    from kvbench.strategies import STRATEGIES

    print("models:     " + ", ".join(known_models()) + " (or a local dir, a .gguf file, a hub id)")
    print("strategies (parameters with their defaults):")
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        params = " ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        print(f"  {name:<12} {cls.summary}" + (f"\n  {'':<12} {params}" if params else ""))
    print("suites:")
    for name in suite_names():
        print(f"  {name:<18} {' '.join(load_suite(name).description.split())}")
    return 0


def cmd_generate(args) -> int:
    from kvbench.bench.metrics import request_timing
    from kvbench.bench.preflight import human_bytes
    from kvbench.engine import GenerationConfig, SamplingConfig, generate
    from kvbench.models import load_model
    from kvbench.bench.spec import parse_strategy

    strategy = parse_strategy(args.strategy).build()
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
    )
    _quiet_transformers()
    lm = load_model(args.model, args.device, args.dtype)
    prompt = lm.encode(args.prompt, chat=not args.no_chat)
    result = generate(lm, strategy, [prompt], config)
    timing = request_timing(result.step_times_s)
    print(lm.decode(result.tokens[0]))
    print(f"\n[{lm.name} | {parse_strategy(args.strategy).label} | {lm.device} {str(lm.dtype).removeprefix('torch.')}] "
          f"prompt {len(prompt)} tokens, output {len(result.tokens[0])} tokens")
    tpot = "–" if timing.tpot_ms is None else f"{timing.tpot_ms:.1f} ms"
    tps = "–" if timing.decode_tokens_per_s is None else f"{timing.decode_tokens_per_s:.1f}"
    print(f"TTFT {timing.ttft_ms:.1f} ms | TPOT {tpot} | E2E {timing.e2e_ms:.1f} ms | decode {tps} tok/s | "
          f"KV cache {human_bytes(result.kv_cache_bytes)} | peak mem {human_bytes(max(result.peak_mem_bytes.values()))} "
          f"({result.mem_kind})")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_run(args) -> int:
    from kvbench.bench.preflight import parse_bytes
    from kvbench.bench.report import one_line_summary, write_report
    from kvbench.bench.runner import RunOptions, run_suite
    from kvbench.bench.spec import load_suite

    spec = load_suite(args.suite)
    if getattr(spec, "kind", None) in ("reuse", "traffic"):
        return _run_reuse(spec, args)
    spec = spec.resolved(args.quick).with_overrides(
        model=args.model, models=() if args.model else None, device=args.device, dtype=args.dtype,
        trials=args.trials, warmup=args.warmup,
        strategies=[s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None,
    )
    memory_limit = None if args.memory_limit is None else parse_bytes(args.memory_limit)
    if args.dry_run:
        print(f"{spec.name}: {len(spec.points())} points x {spec.trials} trials (+{spec.warmup} warmup each) on "
              f"{', '.join(spec.model_names())}")
        for point in spec.points():
            print(f"  {point.key}")
        return 0
    out = args.out or Path("results") / spec.name
    options = RunOptions(
        out=out, resume=args.resume, repair=args.repair,
        memory_limit=memory_limit, progress=not args.no_progress,
    )
    _quiet_transformers()
    outcome = run_suite(spec, options)
    for note in outcome.notes:
        print(f"note: {note}")
    report = write_report(out)
    resumed = f", {outcome.skipped} already measured" if outcome.skipped else ""
    print(f"{spec.name}: {outcome.measured} trials measured{resumed}; {one_line_summary(out)}")
    print(f"report: {report}")
    return 0


def _run_reuse(spec, args) -> int:
    from kvbench.bench.reuse_report import write_reuse_report
    from kvbench.bench.reuse_runner import run_reuse_suite
    from kvbench.bench.runner import RunOptions

    if args.strategies or args.warmup is not None or args.memory_limit is not None:
        raise KvbenchError(f"suite {spec.name!r} is a {spec.kind} suite: it takes no --strategies, --warmup "
                           "or --memory-limit")
    spec = spec.resolved(args.quick, model=args.model, device=args.device, dtype=args.dtype, trials=args.trials)
    if args.dry_run:
        print(f"{spec.name}: {len(spec.points())} request sequences x {spec.trials} trials on {spec.model}")
        for point in spec.points():
            print(f"  {point.key}")
        return 0
    out = args.out or Path("results") / spec.name
    _quiet_transformers()
    outcome = run_reuse_suite(spec, RunOptions(out=out, resume=args.resume, repair=args.repair,
                                               progress=not args.no_progress))
    report = write_reuse_report(out)
    resumed = f", {outcome.skipped} already measured" if outcome.skipped else ""
    print(f"{spec.name}: {outcome.measured} request sequences measured{resumed}")
    print(f"report: {report}")
    return 0


def cmd_report(args) -> int:
    from kvbench.bench.records import run_kind

    kind = run_kind(args.out)
    if kind in ("reuse", "traffic"):
        from kvbench.bench.reuse_report import write_reuse_report

        print(f"report: {write_reuse_report(args.out)}")
        return 0
    if kind == "load":
        from kvbench.load.report import one_line, write_load_report

        report = write_load_report(args.out)
        print(one_line(args.out))
        print(f"report: {report}")
        return 0
    from kvbench.bench.report import one_line_summary, write_report  # its figures need matplotlib

    report = write_report(args.out)
    print(one_line_summary(args.out))
    print(f"report: {report}")
    return 0


def load_config(args) -> LoadConfig:
    """The run's config from the parsed `kvbench load` flags (the flags' defaults are the config's)."""
    from kvbench.load.aggregate import parse_slo
    from kvbench.load.arrivals import parse_rate
    from kvbench.load.run import LoadConfig
    from kvbench.load.workloads import LoadWorkload

    rates = args.request_rates.split(",") if args.request_rates else [args.request_rate]
    workload = LoadWorkload(
        kind=args.workload, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
        prefix_tokens=args.prefix_tokens, prefixes=args.prefixes, suffixes=args.suffixes,
        conversations=args.conversations, turns=args.turns, seed=args.seed,
    )
    return LoadConfig(
        url=args.url, model=args.model, endpoint=args.endpoint, workload=workload,
        request_rates=tuple(parse_rate(r.strip()) for r in rates), burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, num_requests=args.num_requests, duration_s=args.duration,
        slo=parse_slo(args.slo) if args.slo else None, seed=args.seed, timeout_s=args.timeout,
        tokenizer=args.tokenizer, ignore_eos=args.ignore_eos, same_prompts_each_rate=args.same_prompts_each_rate,
        max_error_rate=args.max_error_rate,
    )


def cmd_load(args) -> int:
    from kvbench.bench.records import RESULTS, read_records
    from kvbench.load.report import failures_line, one_line, over_error_rate, summarize_run, write_load_report
    from kvbench.load.run import run_load_config

    config = load_config(args)
    out = args.out or Path("results") / "load"
    if config.tokenizer:
        _quiet_transformers()
    try:
        outcome = run_load_config(config, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        if not read_records(out / RESULTS, strict=False):  # Ctrl-C came before the first send
            print("kvbench: interrupted before any request was sent; nothing to report", file=sys.stderr)
            return 130
        report = write_load_report(out)
        print(f"kvbench: interrupted; the requests already measured are in {out}; partial report: {report}",
              file=sys.stderr)
        return 130
    report = write_load_report(out)
    print(f"{outcome.records} requests measured; {one_line(out)}")
    summary = summarize_run(out)
    if failures := failures_line(summary):
        print(failures)
    print(f"report: {report}")
    if config.max_error_rate is not None and (over := over_error_rate(summary, config.max_error_rate)):
        print(f"kvbench: error: {'; '.join(over)}: above --max-error-rate {config.max_error_rate:g}; "
              f"the records and report are in {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
