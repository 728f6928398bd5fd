"""`kvbench serve`'s flags and start-up: load the model, build the engine, serve until SIGINT / SIGTERM.

The engine's flags are made from `EngineConfig`'s fields (`max_num_seqs` -> `--max-num-seqs`, a True
boolean -> `--no-...`), so a field added there is a flag here with no edit; defaults stay the dataclass's
(a flag not given is not passed). Fields whose values are not plain numbers or names say how to read them
in `PARSERS`; flags whose names differ from the field's (vLLM's) are in `FLAG_NAMES`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from kvbench.bench.preflight import parse_bytes
from kvbench.serve.config import BYTE_FIELDS, EngineConfig

PARSERS = dict.fromkeys(BYTE_FIELDS, parse_bytes)  # field -> how to read its flag's value (default: the field type)
FLAG_NAMES = {"enable_prefix_caching": "prefix-caching"}  # field -> flag name, where vLLM's differs from the field
HELP = {  # where "default <value>" does not say it
        "kv_cache_memory": "the KV pool's size, e.g. 512MiB (default 256MiB)",
        "num_blocks": "the KV pool's size in blocks (wins over --kv-cache-memory)",
        "swap_space": "the host tier's size for --preemption swap, e.g. 4GiB (default: unlimited)",
        "max_model_len": "default: the model's context window",
        "kv_spill_ram": "spill evicted prefix blocks into a RAM tier of this size, e.g. 1GiB (default: no spill)",
        "kv_spill_dir": "a disk tier under the spill's RAM tier, in this directory (needs --kv-spill-ram)",
        "kv_host_memory": "offloaded / speculative_fetch: the host tier holding the pool, e.g. 8GiB; the KV cap then "
                          "counts only what stays on the device (default: the pool is sized by the cap)"}
STEP_LOG_LIMIT = 1000  # the server's engine keeps its last steps' stats, not every step's
TYPES = {"int": int, "float": float, "str": str}


def add_flags(p: argparse.ArgumentParser) -> None:
    from kvbench.device import DEVICES, DTYPES
    from kvbench.models import EMBEDDED
    from kvbench.serve.server import ServerConfig

    server = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    p.add_argument("--model", default=EMBEDDED, help="the embedded default (smollm2-135m), synthetic:<tiny|135m|1b>, "
                                                     "a local dir, a .gguf file or a hub id")
    p.add_argument("--served-model-name", help="the name clients send as `model` (default: --model)")
    p.add_argument("--host", default=server["host"])
    p.add_argument("--port", type=int, default=server["port"], help="0: any free port (printed)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto")
    p.add_argument("--max-waiting", type=int, default=server["max_waiting"],
                   help="answer 503 when this many requests already wait (default: no limit)")
    engine = p.add_argument_group("engine (EngineConfig; defaults as there)")
    for f in dataclasses.fields(EngineConfig):
        name = FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
        if isinstance(f.default, bool):
            engine.add_argument(f"--no-{name}" if f.default else f"--{name}", dest=f.name, default=None,
                                action="store_false" if f.default else "store_true")
            continue
        kind = PARSERS.get(f.name) or TYPES[str(f.type).split("|")[0].strip()]
        engine.add_argument(f"--{name}", dest=f.name, type=kind, default=None, help=HELP.get(f.name, f"default {f.default}"))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in given.items() if v is not None})


def main(args: argparse.Namespace) -> int:
    from kvbench.models import load_model
    from kvbench.serve.engine import Engine
    from kvbench.serve.server import Server, ServerConfig

    config = engine_config(args)
    server_config = ServerConfig(args.served_model_name or args.model, args.host, args.port, args.max_waiting)
    lm = load_model(args.model, args.device, args.dtype)
    engine = Engine(lm, config, step_log_limit=STEP_LOG_LIMIT)
    usage = engine.kv.pool.usage()

    async def run() -> None:
        server = Server(engine, server_config)
        await server.start()
        server.install_signal_handlers()
        print(f"kvbench serve: {server_config.served_model_name} on http://{args.host}:{server.port}/v1 "
              f"({config.kv_backend} KV, {usage.total} blocks of {engine.kv.pool.block_size} tokens, "
              f"max_num_seqs {config.max_num_seqs}); Ctrl-C to stop", flush=True)
        await server.serve_until_stopped()
        print("kvbench serve: stopped", file=sys.stderr, flush=True)

    asyncio.run(run())
    return 0
