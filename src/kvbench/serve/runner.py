"""One step's forward: the packed inputs and attention metadata from a plan, the model call, sampling.

Metadata is built from Python lists and block tables turned into tensors once per step (never per
layer): every layer of the forward reuses the same `StepContext`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine import model_runner
from kvbench.engine.sampling import Sampler
from kvbench.serve.attention import Chunk, SingleGroup, StepContext, paged_attention
from kvbench.serve.block_pool import BlockPool
from kvbench.serve.kv import KVStore
from kvbench.serve.scheduler import Row


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    logits_indices: torch.Tensor  # [E]: the packed row of each emitting request's last token
    emitting: list[Row]  # in the order of logits_indices
    ctx: StepContext
    singles: list[Row]  # the single-token rows in packed order (the rows of ctx.single_mass)
    chunks: list[Row]  # the chunks' rows, in the order of ctx.chunks


def context_slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of `positions` in the blocks of `table` (`[..., blocks]`, broadcast over leading dims)."""
    return table[..., positions // block_size] * block_size + positions % block_size


# A new group of single rows starts where padding the remaining rows to the current group's length would
# waste at least this many token slots: about what one more gather + SDPA per layer costs on a CPU (a
# long request then no longer pads every short row beside it to its length).
GROUP_MIN_SAVED_SLOTS = 4096


def single_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split rows sorted by context length, longest first, into [r0, r1) groups attended together."""
    groups, r0 = [], 0
    for i in range(1, len(lengths)):
        if (lengths[r0] - lengths[i]) * (len(lengths) - i) >= GROUP_MIN_SAVED_SLOTS:
            groups.append((r0, i))
            r0 = i
    return groups + [(r0, len(lengths))] if lengths else []


def prepare(rows: list[Row], pool: BlockPool, store: KVStore, device: torch.device) -> StepInputs:
    """Pack the plan's rows into one `[1, T]` row: single-token rows first, longest context first (attended in
    groups), then chunks."""
    singles = sorted((r for r in rows if r.n == 1), key=lambda r: -r.entry)
    chunks = [r for r in rows if r.n > 1]
    ordered = singles + chunks
    ids, positions, slots, last = [], [], [], []
    for row in ordered:
        tokens = row.request.tokens
        ids.extend(tokens[row.start:row.start + row.n])
        positions.extend(range(row.start, row.start + row.n))
        slots.extend(pool.slots(row.request.request_id, row.entry, row.entry + row.n))
        last.append(len(ids) - 1)
    bs = pool.block_size
    lengths = [r.entry + 1 for r in singles]  # entries attended
    groups = []
    for r0, r1 in single_groups(lengths):
        longest = lengths[r0]
        width = pool.blocks_for(longest)
        tables = [pool.tables[r.request.request_id][:width] for r in singles[r0:r1]]
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        span = torch.arange(longest, device=device)
        index = context_slots(table, span, bs)  # padding reads block 0's slots, masked out below
        mask = None
        if lengths[r1 - 1] < longest:
            mask = (span[None] < torch.tensor(lengths[r0:r1], device=device)[:, None])[:, None, None]
        groups.append(SingleGroup(r0, r1, index, mask))
    packed_chunks, q0 = [], len(singles)
    for row in chunks:  # in entries: a request that evicted attends its kept entries and its new ones causally
        end = row.entry + row.n
        table = torch.tensor(pool.tables[row.request.request_id][:pool.blocks_for(end)], device=device)
        span = torch.arange(end, device=device)
        mask = None
        if row.entry:
            mask = span[None] <= torch.arange(row.entry, end, device=device)[:, None]
        packed_chunks.append(Chunk(q0, q0 + row.n, context_slots(table, span, bs), mask))
        q0 += row.n
    ctx = StepContext(store, torch.tensor(slots, device=device), len(singles), tuple(groups), tuple(packed_chunks))
    emitting = [(i, row) for i, row in zip(last, ordered) if row.emits]
    return StepInputs(
        input_ids=torch.tensor([ids], device=device),
        positions=torch.tensor([positions], device=device),
        logits_indices=torch.tensor([i for i, _ in emitting], dtype=torch.long, device=device),
        emitting=[row for _, row in emitting],
        ctx=ctx,
        singles=singles,
        chunks=chunks,
    )


def run_model(model, inputs: StepInputs) -> torch.Tensor:
    """Logits `[E, vocab]` of the emitting rows."""
    with paged_attention(model):
        logits = model_runner.forward_packed(model, inputs.input_ids, inputs.positions, inputs.logits_indices,
                                             kvbench_ctx=inputs.ctx)
    return logits[0]


def sample(logits: torch.Tensor, rows: list[Row], samplers: dict[int, Sampler]) -> list[int]:
    """One token per emitting row: greedy rows by one argmax, sampled rows by their request's own
    seeded generator (so a request draws what it would draw alone)."""
    if not rows:
        return []
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        sampler = samplers.get(row.request.request_id)
        if sampler is not None:
            tokens[i] = sampler(logits[i:i + 1])[0]
    return tokens.tolist()
