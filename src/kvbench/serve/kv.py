"""Where the KV lives: per layer `[num_blocks, block_size, kv_heads, head_dim]` (vLLM's NHD layout), and
the block pool that hands out its slots.

Three backends behind the one interface (a pool that the scheduler asks for room, and a store):
- `paged`: blocks of `block_size` tokens, allocated as requests grow, shared prefixes held once;
- `contiguous`: one slab of `max_model_len` tokens per request (TensorRT-LLM's "paging off"), the
  baseline paging is compared against. It is a pool whose single block per request is the whole slab,
  never shared, so it reserves `max_model_len` tokens per running request whatever its length;
- `per_seq` (`kvbench.serve.per_seq`): one strategy cache per request, accounted in a token ledger.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvbench.errors import KvbenchError
from kvbench.reuse.blocks import Namespace
from kvbench.serve.block_pool import BlockPool
from kvbench.serve.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig

if TYPE_CHECKING:
    from kvbench.serve.policies import PagedPolicy


@dataclass(frozen=True)
class StoreShape:
    """What a store holds: `num_blocks` blocks of `block_size` tokens per layer, each token `kv_heads` x `head_dim`."""

    layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def args(self) -> tuple:
        """`KVStore`'s positional arguments."""
        return (self.layers, self.num_blocks, self.block_size, self.kv_heads, self.head_dim, self.dtype, self.device)


class KVStore:
    """The K and V tensors of every layer. Slots are rows of the flat `[num_blocks * block_size, kvh, d]`
    view; zero-filled, so a padded gather never reads NaN from memory nobody wrote."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_blocks * block_size

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store new tokens' K/V `[T, kvh, d]` in `slots` `[T]` of `layer` (the attention's only write)."""
        k_pool, v_pool = self.flat(layer)
        k_pool.index_copy_(0, slots, keys)
        v_pool.index_copy_(0, slots, values)

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V `[*index.shape, kvh, d]` of the slots in `index` (the attention's only read): a store that
        holds its KV elsewhere or encoded (host tier, quantized blocks) overrides this and `write`."""
        k_pool, v_pool = self.flat(layer)
        shape = (*index.shape, *k_pool.shape[1:])
        flat = index.flatten()
        return k_pool.index_select(0, flat).view(shape), v_pool.index_select(0, flat).view(shape)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of slots `src` into slots `dst` in every layer (all read before any is written)."""
        for layer in range(len(self.k)):
            for pool in self.flat(layer):
                pool.index_copy_(0, dst, pool.index_select(0, src))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def block_bytes(self) -> int:
        """K and V of one block over every layer (what swap and spill copy per block)."""
        return self.nbytes // self.k[0].shape[0]


@dataclass
class KV:
    """A backend: the pool that hands out slots and the store that holds them."""

    backend: str
    pool: BlockPool  # per_seq: a TokenLedger with the scheduler's pool interface
    store: KVStore  # per_seq: its SeqCaches
    max_model_len: int
    chunked_prefill: bool = True  # False: its KV cannot be built a prompt chunk at a time
    policy: PagedPolicy | None = None  # paged: the strategy's native block-level version, if one is set


def model_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a Llama-style config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def block_tokens(config: EngineConfig, context_window: int) -> int:
    """Tokens per pool block: `block_size` when paged, the whole `max_model_len` slab when contiguous."""
    return config.block_size if config.kv_backend == "paged" else config.max_model_len or context_window


def make_kv(lm, config: EngineConfig) -> KV:
    """Size and allocate the backend `config` asks for, for model `lm`."""
    layers, kv_heads, head_dim = model_shape(lm.config)
    token_bytes = layers * kv_heads * head_dim * 2 * torch.empty((), dtype=lm.dtype).element_size()
    max_model_len = config.max_model_len or lm.context_window
    if max_model_len > lm.context_window:
        raise KvbenchError(f"max_model_len {max_model_len} exceeds the context window of {lm.name} "
                           f"({lm.context_window} tokens); lower max_model_len")
    if config.kv_backend == "per_seq":
        from kvbench.serve import per_seq

        return per_seq.make_kv(lm, config, max_model_len)
    block_size = block_tokens(config, lm.context_window)
    from kvbench.serve.policies import make_policy

    policy = make_policy(config)
    shape = StoreShape(layers, 0, block_size, kv_heads, head_dim, lm.dtype, lm.device)
    cap = config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
    if config.num_blocks is not None:
        num_blocks = config.num_blocks
    elif config.kv_host_memory is not None:  # a host tier holds the pool; the cap bounds what stays on the device
        device_bytes = policy.device_token_bytes(shape)
        num_blocks = config.kv_host_memory // (block_size * token_bytes)
        if device_bytes:
            num_blocks = min(num_blocks, cap // (block_size * device_bytes))
    else:
        num_blocks = cap // (block_size * token_bytes)
    if num_blocks < 1:
        raise KvbenchError(f"kv_cache_memory holds no {config.kv_backend} block of {block_size} tokens "
                           f"({block_size * token_bytes} bytes); raise kv_cache_memory or lower max_model_len")
    caching = config.enable_prefix_caching and config.kv_backend == "paged" and (policy is None or policy.caches_prefixes)
    namespace = Namespace(lm.fingerprint, str(lm.dtype).removeprefix("torch."), block_size) if caching else None
    shape = dataclasses.replace(shape, num_blocks=num_blocks)
    if policy is not None:
        pool, store = policy.make_pool_and_store(config, shape, token_bytes, namespace)
    else:
        pool, store = BlockPool(num_blocks, block_size, token_bytes, namespace), KVStore(*shape.args)
    return KV(config.kv_backend, pool, store, max_model_len, policy=policy)
