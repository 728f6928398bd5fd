"""The `kvbench` command: env, list, generate, run, report, compare, load, serve."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from kvbench.bench.runner import RunOptions
    from kvbench.bench.spec import RunSpec
    from kvbench.load.spec import LoadSpec


# The commands whose flags take their choices and defaults from modules that import torch; the parser builds
# those flags only when one of them runs, so `kvbench load` and `kvbench report` never import torch.
ENGINE_FLAGS = ("generate", "serve")
# A module the command needs and the install lacks -> the extra that installs it (`kvbench load` needs only the
# tokenizer's; every other command that fails this way runs models).
EXTRAS = {"load": "load", "serve": "serve"}


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
    if engine_flags:
        _generate_flags(g)
    _run_parser(sub)
    rep = sub.add_parser("report", help="write OUT/report.md and OUT/figures from a run's results (any kind of run)")
    rep.add_argument("out", type=Path)
    cmp = sub.add_parser("compare", help="runs side by side in one markdown table, rows aligned on what they measured")
    cmp.add_argument("outs", type=Path, nargs="+", metavar="OUT", help="run directories (two or more, of any kind)")
    cmp.add_argument("--out", type=Path, help="also write the table to this .md file")
    _load_parser(sub)
    sv = sub.add_parser("serve", help="the serving engine behind an OpenAI-compatible HTTP server (drive it with kvbench load)")
    if engine_flags:
        from kvbench.serve.launch import add_flags

        add_flags(sv)
    return parser


MODEL_HELP = "the embedded default (smollm2-135m), synthetic:<tiny|135m|1b>, a local dir, a .gguf file or a hub id"


def _generate_flags(g: argparse.ArgumentParser) -> None:
    """`generate`'s flags, whose choices and defaults come from modules that import torch."""
    from kvbench.device import DEVICES, DTYPES
    from kvbench.models import EMBEDDED
    from kvbench.strategies import STRATEGIES

    gen, sampling = _defaults()
    g.add_argument("prompt")
    g.add_argument("--model", default=EMBEDDED, help=MODEL_HELP)
    g.add_argument("--device", choices=DEVICES, default="auto")
    g.add_argument("--dtype", choices=list(DTYPES), default="auto")
    g.add_argument("--strategy", default="dynamic",
                   help=f"one of {', '.join(STRATEGIES.names())}, with parameters as name:key=value (e.g. h2o:budget=0.25)")
    g.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens)
    g.add_argument("--temperature", type=float, default=sampling.temperature, help="0 is greedy; otherwise at least 0.001")
    g.add_argument("--top-k", type=int, default=sampling.top_k)
    g.add_argument("--top-p", type=float, default=sampling.top_p)
    g.add_argument("--seed", type=int, default=sampling.seed)
    g.add_argument("--no-chat", action="store_true", help="send the prompt without the chat template")


def _run_parser(sub) -> None:
    """`run`'s flags: torch-free, so a load spec runs on an install without torch (a bad device or dtype is refused
    by the run's own checks, with the valid values)."""
    r = sub.add_parser("run", help="run a spec of any kind (a shipped name or a .yaml path: suite, reuse, traffic, serve, "
                                   "load) and write its report")
    r.add_argument("suite")
    r.add_argument("--model", help=MODEL_HELP + "; for a load spec, the served model's name")
    r.add_argument("--device", help="auto, cpu, cuda or mps")
    r.add_argument("--dtype", help="auto, float32, float16 or bfloat16")
    r.add_argument("--quick", action="store_true", help="the suite's small version (under 2 minutes on a laptop CPU)")
    r.add_argument("--trials", type=int)
    r.add_argument("--warmup", type=int)
    r.add_argument("--strategies", help="comma-separated, replaces the suite's list (name or name:key=value:...)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any key of the spec (repeatable; VALUE is read as YAML), e.g. --set url=http://host:8000/v1 "
                        "--set request_rates=[1,4,inf]")
    r.add_argument("--out", type=Path, help="output dir (default results/SUITE)")
    r.add_argument("--resume", action="store_true", help="skip trials already in OUT/results.jsonl")
    r.add_argument("--repair", action="store_true", help="drop corrupt lines of OUT/results.jsonl first")
    r.add_argument("--memory-limit", help="refuse sweeps estimated above this (e.g. 8GB); default 80%% of available")
    r.add_argument("--dry-run", action="store_true", help="list the points and exit")
    r.add_argument("--no-progress", action="store_true")


def _load_parser(sub) -> None:
    from kvbench.load.spec import LoadSpec
    from kvbench.load.stream import ENDPOINTS
    from kvbench.workloads import KINDS, WorkloadSpec

    cfg, wl = LoadSpec(url="http://x"), WorkloadSpec()
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
    ld.add_argument("--workers", type=int, default=cfg.workers,
                    help="client processes sending the requests (for rates one process cannot send on time)")
    ld.add_argument("--seed", type=int, default=cfg.seed)
    ld.add_argument("--out", type=Path, help="output dir (default results/load)")
    ld.add_argument("--resume", action="store_true", help="measure only the rates not yet in OUT/results.jsonl")
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
    """What an interrupted command kept and how to go on."""
    if getattr(args, "command", None) in ("run", "load"):
        return "kvbench: interrupted; every record already measured is kept (rerun with --resume)"
    return "kvbench: interrupted"


def main(argv: list[str] | None = None) -> int:
    _one_line_warnings()
    args = None
    command = _command(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(engine_flags=command in ENGINE_FLAGS).parse_args(argv)
        return {"env": cmd_env, "list": cmd_list, "generate": cmd_generate, "run": cmd_run, "report": cmd_report,
                "compare": cmd_compare, "load": cmd_load, "serve": cmd_serve}[args.command](args)
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

    from kvbench.bench.spec import load_spec, spec_names
    from kvbench.models import known_models
    from kvbench.strategies import STRATEGIES

    print("models:     " + ", ".join(known_models()) + " (or a local dir, a .gguf file, a hub id)")
    print("strategies (parameters with their defaults):")
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        params = " ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        print(f"  {name:<12} {cls.summary}" + (f"\n  {'':<12} {params}" if params else ""))
    print("specs (kvbench run NAME):")
    for name in spec_names():
        spec = load_spec(name)
        print(f"  {name:<18} [{spec.kind}] {' '.join(spec.description.split())}")
    return 0


def cmd_generate(args) -> int:
    from kvbench.bench.metrics import request_timing
    from kvbench.bench.preflight import human_bytes
    from kvbench.engine import GenerationConfig, SamplingConfig, generate
    from kvbench.models import load_model
    from kvbench.bench.suite import parse_strategy

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
    from kvbench.bench.runner import RunOptions
    from kvbench.bench.spec import load_spec

    spec = load_spec(args.suite)
    flags = {"model": args.model, "device": args.device, "dtype": args.dtype, "trials": args.trials,
             "warmup": args.warmup, "memory_limit": args.memory_limit,
             "strategies": [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None}
    given = {k: v for k, v in flags.items() if v is not None}
    fields = set(spec.to_dict()) | ({"memory_limit"} if spec.kind != "load" else set())
    refused = sorted(set(given) - fields)
    if refused:
        raise KvbenchError(f"{spec.name!r} is a {spec.kind} spec: it takes no "
                           f"{', '.join('--' + k.replace('_', '-') for k in refused)}")
    given.pop("memory_limit", None)
    given.update(_settings(args.set))  # unknown keys are refused by the spec's own validation, with the valid ones
    if args.model and "models" in fields:
        given["models"] = ()  # --model replaces a model-size axis
    spec = spec.resolved(args.quick, **given)
    memory_limit = None
    if args.memory_limit is not None:
        from kvbench.bench.preflight import parse_bytes

        memory_limit = parse_bytes(args.memory_limit)
    if args.dry_run:
        points = spec.points()
        target = ", ".join(spec.model_names()) if hasattr(spec, "model_names") else getattr(spec, "url", None) or spec.model
        warmup = f" (+{spec.warmup} warmup each)" if getattr(spec, "warmup", 0) else ""
        print(f"{spec.name} ({spec.kind}): {len(points)} points x {spec.trials} trials{warmup} on {target}")
        for point in points:
            print(f"  {point.key}")
        return 0
    out = args.out or Path("results") / spec.name
    return _run(spec, RunOptions(out=out, resume=args.resume, repair=args.repair, memory_limit=memory_limit,
                                 progress=not args.no_progress))


def _settings(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs, each VALUE read as YAML (numbers, lists, mappings, null)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KvbenchError(f"cannot read --set {pair!r}; write --set KEY=VALUE, e.g. --set trials=5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise KvbenchError(f"cannot read the value of --set {pair!r} as YAML; quote it, e.g. --set 'name=\"x y\"'") from None
    return out


def _run(spec: RunSpec, options: RunOptions) -> int:
    """Run any spec, then write its report; Ctrl-C keeps the records and writes a partial report."""
    from kvbench.bench.records import RESULTS, read_records
    from kvbench.bench.runner import run
    from kvbench.report import one_line, write_report

    if spec.kind != "load" or getattr(spec, "tokenizer", None):
        _quiet_transformers()
    try:
        outcome = run(spec, options)
    except KeyboardInterrupt:
        if not read_records(options.out / RESULTS, strict=False):
            print("kvbench: interrupted before anything was measured; nothing to report", file=sys.stderr)
            return 130
        print(f"kvbench: interrupted; every record already measured is kept in {options.out} (rerun with --resume); "
              f"partial report: {write_report(options.out)}", file=sys.stderr)
        return 130
    for note in outcome.notes:
        print(f"note: {note}")
    report = write_report(options.out)
    resumed = f", {outcome.skipped} already measured" if outcome.skipped else ""
    print(f"{spec.name}: {outcome.measured} measurements (points x trials){resumed}; {one_line(options.out)}")
    print(f"report: {report}")
    if spec.kind == "load":
        return _check_errors(spec, options.out)
    return 0


def _check_errors(spec: LoadSpec, out: Path) -> int:
    """Exit 1 when the share of failed requests at any rate is above the spec's max_error_rate."""
    from kvbench.report.load import failures_line, over_error_rate, summarize_run
    from kvbench.report.run import read_run

    summary = summarize_run(read_run(out))
    if failures := failures_line(summary):
        print(failures)
    if spec.max_error_rate is not None and (over := over_error_rate(summary, spec.max_error_rate)):
        print(f"kvbench: error: {'; '.join(over)}: above --max-error-rate {spec.max_error_rate:g}; "
              f"the records and report are in {out}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from kvbench.report import one_line, write_report

    report = write_report(args.out)
    print(one_line(args.out))
    print(f"report: {report}")
    return 0


def cmd_compare(args) -> int:
    from kvbench.bench.records import atomic_write_text
    from kvbench.report.compare import compare

    text = compare(args.outs)
    print(text, end="")
    if args.out:
        try:
            atomic_write_text(args.out, text)
        except OSError as exc:
            raise KvbenchError(f"cannot write {args.out} ({exc.strerror}); choose another --out") from None
        print(f"comparison: {args.out}")
    return 0


def load_spec_from_flags(args) -> LoadSpec:
    """The run's spec from the parsed `kvbench load` flags (the flags' defaults are the spec's)."""
    from kvbench.load.aggregate import parse_slo
    from kvbench.load.arrivals import parse_rate
    from kvbench.load.spec import LoadSpec
    from kvbench.workloads import WorkloadSpec

    rates = args.request_rates.split(",") if args.request_rates else [args.request_rate]
    workload = WorkloadSpec(
        kind=args.workload, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
        prefix_tokens=args.prefix_tokens, prefixes=args.prefixes, suffixes=args.suffixes,
        conversations=args.conversations, turns=args.turns, seed=args.seed,
    )
    return LoadSpec(
        name="load", url=args.url, model=args.model, endpoint=args.endpoint, workload=workload,
        request_rates=tuple(parse_rate(r.strip()) for r in rates), burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, num_requests=args.num_requests, duration_s=args.duration,
        slo=parse_slo(args.slo) if args.slo else None, seed=args.seed, timeout_s=args.timeout,
        tokenizer=args.tokenizer, ignore_eos=args.ignore_eos, same_prompts_each_rate=args.same_prompts_each_rate,
        max_error_rate=args.max_error_rate, workers=args.workers,
    )


def cmd_load(args) -> int:
    from kvbench.bench.runner import RunOptions

    spec = load_spec_from_flags(args)
    out = args.out or Path("results") / "load"
    return _run(spec, RunOptions(out=out, resume=args.resume, progress=not args.no_progress))


def cmd_serve(args) -> int:
    from kvbench.serve.launch import main

    _quiet_transformers()
    return main(args)


if __name__ == "__main__":
    sys.exit(main())
