"""The serving engine's configuration. Field names follow vLLM's flags where vLLM has one."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvbench.errors import KvbenchError

KV_BACKENDS = ("paged", "contiguous", "per_seq")
ADMISSIONS = ("optimistic", "reserve")
PREEMPTIONS = ("recompute", "swap")
BATCHINGS = ("continuous", "static")
DEFAULT_KV_CACHE_MEMORY = 256 * 2**20  # bytes; stands in for "GPU memory left for KV" on a CPU
# fields that hold bytes: specs and flags take sizes such as 256MiB
BYTE_FIELDS = ("kv_cache_memory", "swap_space", "kv_spill_ram", "kv_host_memory")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches requests and holds their KV.

    kv_backend: `paged` (a pool of `block_size`-token blocks, shared prefixes held once) or `contiguous`
    (one slab of `max_model_len` tokens per request, TensorRT-LLM's "paging off") or `per_seq` (each request
    holds its own cache of `strategy`, a name or `name:key=value` as the CLI takes it; default `dynamic`;
    see `kvbench.serve.per_seq` for what it accounts and what it ignores). On `paged`, `strategy` names a
    policy native to the pool (`kvbench.serve.policies`: sink, h2o, snapkv, quantized, offloaded,
    speculative_fetch), with the same parameters.
    kv_cache_memory / num_blocks: the pool's size in bytes, or in blocks (num_blocks wins).
    kv_host_memory: for the policies whose pool lives in a host tier (offloaded, speculative_fetch), the host
    tier's size in bytes; `kv_cache_memory` then bounds only what they keep on the compute device per token
    (speculative_fetch: its partial keys; offloaded: nothing), as InfiniGen and vLLM's KV offloading count a
    GPU's memory. None: the pool is sized by kv_cache_memory as full KV.
    admission: `optimistic` admits with blocks for the next chunk plus a `watermark` fraction of the
    pool kept free, and preempts the newest request (recompute) when a running one cannot grow;
    `reserve` admits only when prompt + max_tokens fit, and never preempts.
    preemption: `recompute` (the preempted request's blocks are released and its KV computed again) or
    `swap` (its blocks are copied to a host tier of `swap_space` bytes, None = unlimited, and copied
    back when it resumes; when the tier is full that request is recomputed instead).
    batching: `continuous` (requests join and leave the running batch at every step) or `static` (a
    new batch of up to `max_num_seqs` is admitted only when none is running, and runs until its
    longest request ends: static batching without the padding compute, so it flatters static slightly).
    kv_spill_ram / kv_spill_dir: a second-level prefix cache (vLLM's KV offloading connector, LMCache): prefix
    blocks the pool evicts are copied into the reuse store, a RAM tier of `kv_spill_ram` bytes and a disk
    tier in `kv_spill_dir`, and later prompts load them back instead of computing them (`kvbench.serve.spill`).
    """

    kv_backend: str = "paged"
    block_size: int = 16
    kv_cache_memory: int | None = None
    num_blocks: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    admission: str = "optimistic"
    watermark: float = 0.01
    preemption: str = "recompute"
    swap_space: int | None = None  # bytes of host tier for swap preemption; None: unlimited
    batching: str = "continuous"
    max_model_len: int | None = None  # default: the model's context window
    strategy: str | None = None  # per_seq: any strategy; paged: one with a native policy (kvbench.serve.policies)
    kv_spill_ram: int | None = None  # bytes of the RAM tier evicted prefix blocks spill into; None: no spill
    kv_spill_dir: str | None = None  # a disk tier under it (needs kv_spill_ram)
    kv_host_memory: int | None = None  # bytes of the host tier that holds an offloaded / speculative_fetch pool

    def __post_init__(self):
        _one_of("kv_backend", self.kv_backend, KV_BACKENDS)
        _one_of("admission", self.admission, ADMISSIONS)
        _one_of("preemption", self.preemption, PREEMPTIONS)
        _one_of("batching", self.batching, BATCHINGS)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive(name, getattr(self, name))
        for name in ("kv_cache_memory", "num_blocks", "max_model_len", "swap_space", "kv_spill_ram", "kv_host_memory"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.kv_host_memory is not None and (self.kv_backend != "paged" or self.strategy is None):
            raise KvbenchError("kv_host_memory sizes the host tier of a paged offloaded or speculative_fetch pool; "
                               "set kv_backend: paged and strategy: offloaded or speculative_fetch, or drop it")
        if self.kv_backend == "per_seq":
            from kvbench.serve.per_seq import check_config

            check_config(self)
        elif self.strategy is not None and self.kv_backend == "paged":
            from kvbench.serve.policies import check_config

            check_config(self)
        elif self.strategy is not None:
            raise KvbenchError(f"strategy {self.strategy!r} needs kv_backend per_seq (the {self.kv_backend} backend "
                               "holds full KV); set kv_backend: per_seq or drop strategy")
        if self.kv_spill_ram is not None or self.kv_spill_dir is not None:
            from kvbench.serve.spill import check_config

            check_config(self)
        if not 0 <= self.watermark < 1:
            raise KvbenchError(f"watermark must be a fraction of the pool in [0, 1), got {self.watermark!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _one_of(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KvbenchError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise KvbenchError(f"{name} must be a positive whole number, got {value!r}")
