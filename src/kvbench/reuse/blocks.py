"""Token blocks and their identities.

A prompt is cut into blocks of `block_size` tokens from its first token. Each full block has
- a **chain key**: blake2b(previous block's key + this block's tokens). Equal chain keys mean equal
  token prefixes, so the cached K/V are exactly what a fresh prefill would compute.
- a **content key**: blake2b(this block's tokens) alone. It finds the same tokens at another
  position or after another context (non-prefix reuse), where the cached K/V are approximate.

Both are namespaced by model fingerprint, dtype and block size, so another model or precision
never hits, and both are stable across processes and machines (never Python's `hash()`).

Finding a cached block's tokens anywhere in a new prompt uses a rolling fingerprint of every
window of `block_size` tokens, computed for all windows at once with numpy; a window whose
fingerprint matches a stored block is then confirmed by its content key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kvbench.errors import KvbenchError

FORMAT_VERSION = "kvbench-reuse-v1"
_DIGEST = 16  # bytes of blake2b: 128-bit keys
_ROLL_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier; arithmetic wraps mod 2**64


@dataclass(frozen=True)
class Namespace:
    """What must match for a cached block to be usable: the model's weights, precision and blocking."""

    model_fingerprint: str
    dtype: str
    block_size: int

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise KvbenchError(f"block_size must be a positive number of tokens, got {self.block_size!r}")

    @property
    def digest(self) -> bytes:
        text = f"{FORMAT_VERSION}|{self.model_fingerprint}|{self.dtype}|{self.block_size}"
        return hashlib.blake2b(text.encode(), digest_size=_DIGEST).digest()

    @property
    def name(self) -> str:
        return self.digest.hex()


def token_bytes(tokens) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def chain_keys(tokens: list[int], ns: Namespace) -> list[str]:
    """The chain key of every full block of `tokens`, in order."""
    keys, previous = [], None
    for start in range(0, len(tokens) - ns.block_size + 1, ns.block_size):
        previous = extend_chain(previous, tokens[start:start + ns.block_size], ns)
        keys.append(previous)
    return keys


def extend_chain(previous: str | None, block_tokens, ns: Namespace) -> str:
    """The chain key of the block after the block keyed `previous` (None: the first block), so blocks
    completed later (during decode) get the key a whole-prompt `chain_keys` would give them."""
    start = ns.digest if previous is None else bytes.fromhex(previous)
    return hashlib.blake2b(start + token_bytes(block_tokens), digest_size=_DIGEST).hexdigest()


def content_key(tokens, ns: Namespace) -> str:
    return hashlib.blake2b(b"content|" + ns.digest + token_bytes(tokens), digest_size=_DIGEST).hexdigest()


def _powers(block_size: int) -> np.ndarray:
    powers = np.ones(block_size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(block_size - 2, -1, -1):
            powers[i] = powers[i + 1] * _ROLL_BASE
    return powers


def window_fingerprints(tokens, block_size: int) -> np.ndarray:
    """A 64-bit polynomial fingerprint of every window tokens[i:i+block_size], for all i at once."""
    raw = np.asarray(tokens, dtype=np.uint64)
    if len(raw) < block_size:
        return np.zeros(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(raw, block_size)
    with np.errstate(over="ignore"):
        return (windows * _powers(block_size)).sum(axis=1, dtype=np.uint64)


def fingerprint(tokens) -> int:
    """The rolling fingerprint of one block (equal to `window_fingerprints` at its position)."""
    return int(window_fingerprints(tokens, len(tokens))[0])
