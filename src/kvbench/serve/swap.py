"""The host tier that swap preemption copies a request's KV into, under a byte budget.

A swapped-out request's blocks (every layer, K and V, whole blocks: the last one's unwritten slots
too) are copied to host tensors and its pool blocks released; it resumes by copying them back into
fresh blocks, with nothing recomputed. Shared prefix blocks are copied like private ones (the request
drops its reference; the other holders keep theirs), so a swapped request never depends on a block it
does not hold. Bytes are counted exactly: one block moves `block_bytes` in each direction.

On a CPU-only machine the pool itself is host memory, so a swap is a host-to-host copy: the bytes are
exact, the time is not representative of a GPU's PCIe transfer.
"""

from __future__ import annotations

import torch

from kvbench.serve.kv import KVStore


class HostTier:
    """Per-request host copies of KV blocks. `budget` is in bytes; None means no limit but host memory."""

    def __init__(self, store: KVStore, budget: int | None):
        self.store, self.budget = store, budget
        self.block_bytes = store.block_bytes
        self._held: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.bytes_held = 0
        self.bytes_swapped_out = 0
        self.bytes_swapped_in = 0

    def fits(self, num_blocks: int) -> bool:
        return self.budget is None or self.bytes_held + num_blocks * self.block_bytes <= self.budget

    def swap_out(self, request_id: int, blocks: list[int]) -> int:
        """Copy `blocks` of every layer to the host for `request_id`; the bytes moved."""
        assert self.fits(len(blocks)) and request_id not in self._held
        index = torch.tensor(blocks, dtype=torch.long, device=self.store.k[0].device)
        self._held[request_id] = ([k.index_select(0, index).cpu() for k in self.store.k],
                                  [v.index_select(0, index).cpu() for v in self.store.v])
        moved = len(blocks) * self.block_bytes
        self.bytes_held += moved
        self.bytes_swapped_out += moved
        return moved

    def swap_in(self, request_id: int, blocks: list[int]) -> int:
        """Copy `request_id`'s host blocks back into pool `blocks` (as many, in order); the bytes moved."""
        ks, vs = self._held.pop(request_id)
        assert len(blocks) == ks[0].shape[0], "a swapped request resumes into as many blocks as it left"
        index = torch.tensor(blocks, dtype=torch.long, device=self.store.k[0].device)
        for pool, host in zip(self.store.k + self.store.v, ks + vs):
            pool.index_copy_(0, index, host.to(pool.device))
        moved = len(blocks) * self.block_bytes
        self.bytes_held -= moved
        self.bytes_swapped_in += moved
        return moved

    def drop(self, request_id: int) -> None:
        """Forget an aborted request's host copy."""
        ks, _ = self._held.pop(request_id)
        self.bytes_held -= ks[0].shape[0] * self.block_bytes
