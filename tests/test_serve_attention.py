"""The registered paged attention against SDPA on contiguous tensors, and its scoping on the model config."""

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.serve.attention import ATTENTION_NAME, Chunk, SingleGroup, StepContext, check_servable, paged_attention, \
    paged_attention_forward
from kvbench.serve.kv import KVStore
from kvbench.serve.runner import context_slots, single_groups

H, KVH, D, BS, BLOCKS = 4, 2, 8, 4, 32


def test_single_rows_are_grouped_only_where_padding_wastes_enough():
    assert single_groups([]) == []
    assert single_groups([300] * 16) == [(0, 16)]
    assert single_groups([2064] + [300] * 16) == [(0, 1), (1, 17)]  # 16 x 1764 padded slots saved
    assert single_groups([400, 300, 200]) == [(0, 3)]  # too few slots saved for another gather
    assert single_groups([4096, 2048, 1024, 10]) == [(0, 1), (1, 4)]


def _reference(q, k, v):
    """Causal attention of the last q.shape[1] positions over k, v `[L, kvh, d]`, heads repeated (GQA)."""
    n, total = q.shape[0], k.shape[0]
    k, v = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)
    mask = torch.arange(total)[None] <= torch.arange(total - n, total)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)  # [n, H, d]


@pytest.mark.parametrize("groups", [[(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]])
def test_paged_attention_equals_sdpa_on_contiguous_tensors(groups):
    """Single rows attended in one padded group or split into groups give the same output."""
    g = torch.Generator().manual_seed(0)
    store = KVStore(1, BLOCKS, BS, KVH, D, torch.float32, torch.device("cpu"))
    store.k[0].normal_(generator=g)  # garbage in every slot: only the table's slots may count
    store.v[0].normal_(generator=g)
    free = torch.randperm(BLOCKS, generator=g).tolist()
    # (past, new): three single-token rows of different lengths (padding), a chunk after a past, a fresh prompt
    shapes = [(9, 1), (0, 1), (14, 1), (6, 5), (0, 7)]
    full_k, full_v, tables = [], [], []
    for past, new in shapes:
        blocks = [free.pop() for _ in range(-(-(past + new) // BS))]
        tables.append(torch.tensor(blocks))
        full_k.append(torch.randn(past + new, KVH, D, generator=g))
        full_v.append(torch.randn(past + new, KVH, D, generator=g))
        slots = context_slots(tables[-1], torch.arange(past), BS)
        store.k[0].flatten(0, 1)[slots] = full_k[-1][:past]
        store.v[0].flatten(0, 1)[slots] = full_v[-1][:past]
    q = [torch.randn(new, H, D, generator=g) for _, new in shapes]
    single_groups_ = []
    for r0, r1 in groups:
        longest = max(shapes[i][0] + 1 for i in range(r0, r1))
        width = -(-longest // BS)
        table = torch.stack([torch.cat([tables[i], torch.zeros(width, dtype=torch.long)])[:width] for i in range(r0, r1)])
        span = torch.arange(longest)
        lengths = torch.tensor([shapes[i][0] + 1 for i in range(r0, r1)])
        mask = (span[None] < lengths[:, None])[:, None, None]
        single_groups_.append(SingleGroup(r0, r1, context_slots(table, span, BS), mask))
    chunks, q0 = [], 3
    for i in (3, 4):
        past, new = shapes[i]
        span_i = torch.arange(past + new)
        mask = span_i[None] <= torch.arange(past, past + new)[:, None] if past else None
        chunks.append(Chunk(q0, q0 + new, context_slots(tables[i], span_i, BS), mask))
        q0 += new
    slot_mapping = torch.cat([context_slots(tables[i], torch.arange(p, p + n), BS) for i, (p, n) in enumerate(shapes)])
    ctx = StepContext(store, slot_mapping, 3, tuple(single_groups_), tuple(chunks))
    packed = lambda parts: torch.cat(parts).transpose(0, 1)[None]  # [1, heads, T, d]
    new_k = [k[p:] for k, (p, _) in zip(full_k, shapes)]
    new_v = [v[p:] for v, (p, _) in zip(full_v, shapes)]
    out, _ = paged_attention_forward(types.SimpleNamespace(layer_idx=0), packed(q), packed(new_k), packed(new_v),
                                     None, scaling=D ** -0.5, kvbench_ctx=ctx)
    expected = torch.cat([_reference(qi, k, v) for qi, k, v in zip(q, full_k, full_v)])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    for i, (past, new) in enumerate(shapes):  # the new K/V were written to their slots
        slots = context_slots(tables[i], torch.arange(past + new), BS)
        torch.testing.assert_close(store.k[0].flatten(0, 1)[slots], full_k[i])
    # with a mass buffer (a scoring policy), each single row's scores go to its own row of it, in every group
    mass = torch.zeros(3, ctx.single_width)
    out, _ = paged_attention_forward(types.SimpleNamespace(layer_idx=0), packed(q), packed(new_k), packed(new_v),
                                     None, scaling=D ** -0.5, kvbench_ctx=dataclasses.replace(ctx, single_mass=mass))
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    for i in range(3):
        keys = full_k[i].repeat_interleave(H // KVH, dim=1)  # [L, H, d]
        probs = torch.einsum("hd,lhd->hl", q[i][0], keys).mul(D ** -0.5).softmax(-1)  # [H, L]
        expected_mass = probs.view(KVH, H // KVH, -1).mean(1).sum(0)
        torch.testing.assert_close(mass[i, :len(expected_mass)], expected_mass, atol=1e-5, rtol=1e-5)
        assert not mass[i, len(expected_mass):].any()


def test_attention_outside_the_engine_is_refused():
    with pytest.raises(KvbenchError, match="engine step"):
        paged_attention_forward(types.SimpleNamespace(layer_idx=0), *([torch.zeros(1, 1, 1, 1)] * 3), None)


def test_the_model_config_is_restored_after_the_scope(tiny):
    before = tiny.config._attn_implementation
    with pytest.raises(RuntimeError):
        with paged_attention(tiny.model):
            assert tiny.config._attn_implementation == ATTENTION_NAME
            assert all(layer.self_attn.config._attn_implementation == ATTENTION_NAME for layer in tiny.model.model.layers)
            raise RuntimeError("a failing forward")
    assert tiny.config._attn_implementation == before


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig

    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, sliding_window=16)
    with pytest.raises(KvbenchError, match="sliding-window or hybrid"):
        check_servable(types.SimpleNamespace(name="mistral-tiny", config=config))
