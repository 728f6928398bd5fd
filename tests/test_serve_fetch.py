"""Offload and speculative fetch native to the paged pool (`kvbench.serve.fetch`) on the tiny model: offload
changes no token and moves exactly the context each step reads; speculative fetch gathers, per row and KV head,
exactly the best tokens of its partial-key scores (never padding), counts its bytes exactly, matches the
per_seq strategy on the same requests, and fails a step whose fetch was bypassed."""

import json
import random

import pytest
import torch

from kvbench.bench.records import read_records
from kvbench.bench.runner import RunOptions, run
from kvbench.bench.serve_session import ServeSession
from kvbench.bench.serve_spec import ServeSpec
from kvbench.errors import KvbenchError, NotEngaged
from kvbench.report import write_report
from kvbench.serve import Engine, EngineConfig, SamplingParams, runner
from kvbench.serve.fetch import FetchStep, HostTierStore
from kvbench.serve.kv import model_shape
from kvbench.strategies.speculative import fetch_count
from test_serve_policies import _serve as serve_checked

BS = 16
R = 4  # partial channels of the tiny model's 16
SPEC = f"speculative_fetch:budget=0.25:window=8:partial_channels={R}"


def _prompts(seed=0, lengths=(70, 130, 96, 81, 150, 100), prefix=0):
    rng = random.Random(seed)
    shared = [rng.randrange(512) for _ in range(prefix)]
    return [shared + [rng.randrange(512) for _ in range(n - prefix)] for n in lengths]


def _config(strategy=None, **fields):
    fields = {"num_blocks": 256, "block_size": BS, "max_num_batched_tokens": 64, "max_num_seqs": 4, **fields}
    return EngineConfig(strategy=strategy, **fields)


def _serve(lm, config, prompts, max_tokens=24, monkeypatch=None):
    """Serve the prompts (half added while others run); with `monkeypatch`, also return every step's
    planned rows as (entry, n) pairs, recorded from `runner.prepare`'s input (the plan, not the store)."""
    plans = []
    if monkeypatch is not None:
        prepare = runner.prepare
        monkeypatch.setattr(runner, "prepare", lambda rows, *a: plans.append([(r.entry, r.n) for r in rows])
                            or prepare(rows, *a))
    engine, requests = serve_checked(lm, config, prompts, max_tokens)
    return engine, requests, plans


def _head_bytes(lm):
    layers, kvh, d = model_shape(lm.config)
    return layers, kvh, d * 2 * torch.empty((), dtype=lm.dtype).element_size()


def test_offloaded_gives_the_full_kv_tokens_and_moves_exactly_the_context_it_reads(tiny, monkeypatch):
    prompts = _prompts(prefix=40)  # shared prefix: later requests hit the prefix cache and gather it from the host
    _, full, _ = _serve(tiny, _config(), prompts)
    engine, off, plans = _serve(tiny, _config("offloaded"), prompts, monkeypatch=monkeypatch)
    assert [r.output_ids for r in off] == [r.output_ids for r in full]
    assert isinstance(engine.kv.store, HostTierStore) and engine.kv.pool.namespace is not None
    assert sum(r.num_cached or 0 for r in off) > 0
    layers, kvh, head_bytes = _head_bytes(tiny)
    # a single-token row reads its entry + 1 entries; a chunk with a past reads past + n; a first chunk none
    tokens = sum(e + 1 if n == 1 else (e + n if e else 0) for plan in plans for e, n in plan)
    assert engine.kv.store.bytes_moved == tokens * layers * kvh * head_bytes
    assert sum(r.bytes_moved for r in off) == engine.kv.store.bytes_moved


def test_speculative_fetch_at_budget_one_equals_full_kv(tiny):
    prompts = _prompts()
    _, full, _ = _serve(tiny, _config(), prompts)
    engine, spec, _ = _serve(tiny, _config(f"speculative_fetch:budget=1.0:partial_channels={R}"), prompts)
    assert [r.output_ids for r in spec] == [r.output_ids for r in full]
    assert engine.kv.pool.namespace is None  # partial keys are per request: no shared prefix blocks


def _check_picks(fetch, layer, g, q, picks, counts):
    """Every subset row of group `g`: its partial keys are its host keys' channels, and each KV head's gather
    (`picks`, in row order) is the recent window plus the best approximate scores recomputed here (float64)
    from the partial pool, all slots of the row's own context (never padding)."""
    store = fetch.store
    by_slot = {int(p[0, 0]): p for batch in picks for p in batch}  # each row's [kvh, count] slots, by its first
    for b, i in enumerate(range(g.r0, g.r1)):
        length, count = fetch.lengths[i], fetch.counts[i]
        if count == length:
            continue
        assert count == fetch_count(0.25, 8, length)
        context = g.index[b, :length]
        channels = fetch.channels[i][layer]  # [kvh, r]
        partial = store.partial[layer][context]
        assert torch.equal(partial, store.flat(layer)[0][context].gather(-1, channels[None].expand(length, -1, -1)))
        scores = torch.einsum("lhr,hr->hl", partial.double(), q[b].double().mean(dim=1).gather(-1, channels))
        picked = next(p for first, p in by_slot.items() if first in context.tolist())  # [kvh, count] slots
        assert picked.shape == (store.k[0].shape[2], count)
        for h in range(picked.shape[0]):
            entries = {int((context == s).nonzero()) for s in picked[h]}  # raises if a slot is not the row's
            tail = set(range(length - 8, length))
            assert tail <= entries and len(entries) == count
            chosen, rest = sorted(entries - tail), sorted(set(range(length - 8)) - entries)
            assert min(scores[h, chosen]) >= max(scores[h, rest]) - 1e-5
        counts["checked"] += 1
        counts["mixed"] += len(set(fetch.lengths[g.r0:g.r1])) > 1
    assert len(by_slot) == sum(fetch.counts[i] < fetch.lengths[i] for i in range(g.r0, g.r1))


def test_speculative_fetch_gathers_exactly_the_top_partial_scores_and_counts_bytes_exactly(tiny, monkeypatch):
    """Every decode row's gather per KV head is the best of the approximate scores recomputed here from the
    partial pool, padding is never picked (rows of different lengths share groups), and the bytes add up
    to what the plan reads: prefill rows their whole context, decode rows fetch_count tokens per KV head,
    plus each prompt's partial keys uploaded once."""
    heads, counts = [], {"checked": 0, "mixed": 0}
    call, gather_heads = FetchStep.__call__, HostTierStore.gather_heads

    def spy_call(self, layer, g, q, new_keys):
        start = len(heads)
        out = call(self, layer, g, q, new_keys)
        _check_picks(self, layer, g, q, heads[start:], counts)
        return out

    monkeypatch.setattr(FetchStep, "__call__", spy_call)
    monkeypatch.setattr(HostTierStore, "gather_heads", lambda self, layer, index: heads.append(index.clone())
                        or gather_heads(self, layer, index))
    rows = []
    prepare = runner.prepare
    monkeypatch.setattr(runner, "prepare", lambda plan, *a: rows.extend(
        (r.entry, r.n, r.start >= len(r.request.prompt_ids)) for r in plan) or prepare(plan, *a))
    prompts = _prompts()
    engine, requests, _ = _serve(tiny, _config(SPEC), prompts)
    assert counts["checked"] > 50 and counts["mixed"] > 0
    layers, kvh, head_bytes = _head_bytes(tiny)
    tokens = sum((fetch_count(0.25, 8, e + 1) if decoding else e + 1) if n == 1 else (e + n if e else 0)
                 for e, n, decoding in rows)
    uploads = sum(len(p) for p in prompts) * layers * kvh * R * 4
    assert engine.kv.store.bytes_moved == tokens * layers * kvh * head_bytes + uploads
    assert sum(r.bytes_moved for r in requests) == engine.kv.store.bytes_moved
    assert all(r.preemptions == 0 for r in requests)


def test_channels_are_the_prompt_keys_largest_mean_magnitude(tiny):
    engine = Engine(tiny, _config(SPEC))
    prompt = _prompts(lengths=(90,))[0]
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    while not engine.requests[request_id].output_ids:
        engine.step()
    state = engine.requests[request_id].policy_state
    slots = engine.kv.pool.slots(request_id, 0, len(prompt))
    for layer in range(len(engine.kv.store.k)):
        keys = engine.kv.store.flat(layer)[0][slots]  # [P, kvh, d]
        expected = keys.abs().mean(dim=0).topk(R, dim=-1).indices
        assert torch.equal(state.channels[layer], expected)


def test_speculative_fetch_matches_per_seq_on_the_same_requests(tiny):
    """One request at a time, its prompt in one chunk: the paged engine computes the same keys, queries,
    channels and scores as the per_seq strategy, so it picks the same tokens and emits the same ones; its
    bytes are per_seq's fetches plus the partial keys it uploads once per prompt (per_seq computes them where
    the prompt's keys already are)."""
    prompts = _prompts(lengths=(120, 150, 100))
    fields = {"max_num_seqs": 1, "max_num_batched_tokens": 256}
    engine, paged, _ = _serve(tiny, _config(SPEC, **fields), prompts, max_tokens=32)
    _, per_seq, _ = _serve(tiny, EngineConfig(kv_backend="per_seq", strategy=SPEC, **fields), prompts, max_tokens=32)
    assert [r.output_ids for r in paged] == [r.output_ids for r in per_seq]
    layers, kvh, _ = _head_bytes(tiny)
    for p, s, prompt in zip(paged, per_seq, prompts):
        assert p.bytes_moved == s.bytes_moved + len(prompt) * layers * kvh * R * 4


def test_a_bypassed_fetch_fails_the_step(tiny, monkeypatch):
    def whole(self, layer, g, q, new_keys):  # an attention that reads every row's whole context around the picks
        keys, values = (t.transpose(1, 2) for t in self.store.gather(layer, g.index))
        return keys, values, g.mask

    monkeypatch.setattr(FetchStep, "__call__", whole)
    engine = Engine(tiny, _config(SPEC))
    engine.add_request(list(range(100)), SamplingParams(max_tokens=4))
    with pytest.raises(NotEngaged, match="fetched 0 .* where it should have"):
        engine.run_until_idle()


def test_an_offload_that_moves_nothing_fails_the_step(tiny, monkeypatch):
    monkeypatch.setattr(HostTierStore, "gather", lambda self, layer, index: tuple(
        t.index_select(0, index.flatten()).view(*index.shape, *t.shape[1:]) for t in self.flat(layer)))
    engine = Engine(tiny, _config("offloaded"))
    engine.add_request(list(range(100)), SamplingParams(max_tokens=4))
    with pytest.raises(NotEngaged, match="counted 0 bytes moved"):
        engine.run_until_idle()


def test_swap_preemption_is_refused_for_speculative_fetch(tiny):
    with pytest.raises(KvbenchError, match="use preemption recompute"):
        Engine(tiny, _config(SPEC, preemption="swap"))


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_fetch_policies_survive_preemption(tiny, preemption):
    """A pool too small for every request at once: preempted requests resume and finish, bytes still exact."""
    strategies = ["offloaded"] + ([SPEC] if preemption == "recompute" else [])
    prompts = _prompts(lengths=(150, 140, 130, 120))
    _, full, _ = _serve(tiny, _config(num_blocks=24, preemption=preemption), prompts, max_tokens=40)
    for strategy in strategies:
        engine, requests, _ = _serve(tiny, _config(strategy, num_blocks=24, preemption=preemption), prompts,
                                     max_tokens=40)
        assert sum(r.preemptions for r in requests) > 0
        assert all(len(r.output_ids) == 40 for r in requests)
        assert sum(r.bytes_moved for r in requests) == engine.kv.store.bytes_moved
        if strategy == "offloaded":
            assert [r.output_ids for r in requests] == [r.output_ids for r in full]


def test_the_serve_kind_records_paged_bytes_moved_and_says_they_are_host_to_host(tmp_path, tiny):
    spec = ServeSpec.from_dict({
        "kind": "serve", "name": "tiny-fetch", "model": "synthetic:tiny", "device": "cpu", "seed": 3,
        "workload": {"kind": "synthetic", "prompt_tokens": 40, "output_tokens": 6}, "num_requests": 4,
        "request_rates": ["inf"], "engines": [
            {"label": "full", "num_blocks": 64}, {"label": "off", "strategy": "offloaded", "num_blocks": 64},
            {"label": "fetch", "strategy": "speculative_fetch:budget=0.5:window=4:partial_channels=4",
             "num_blocks": 64}]})
    out = tmp_path / "out"
    options = RunOptions(out=out, progress=False)
    assert run(spec, options, ServeSession(spec, options, tiny)).measured == 3
    records = read_records(out / "results.jsonl")
    by_engine = {}
    for r in records:
        by_engine.setdefault(r["method"], []).append(r)
    assert all(r["bytes_moved"] > 0 for r in by_engine["off"] + by_engine["fetch"])
    assert by_engine["full"][0]["bytes_moved"] is None
    write_report(out)
    summary = json.loads((out / "summary.json").read_text())["points"]
    for label in ("off", "fetch"):
        moved = sum(r["bytes_moved"] for r in by_engine[label])
        assert summary[f"{label}@inf"]["bytes_moved_per_token"] == moved / sum(
            r["output_tokens"] for r in by_engine[label])
    notes = json.loads((out / "run.json").read_text())["notes"]
    assert any(n.startswith("offloaded on cpu") for n in notes)
    assert any(n.startswith("speculative_fetch on cpu") for n in notes)


def test_kv_host_memory_puts_the_pool_in_the_host_tier_and_the_cap_bounds_only_device_bytes(tiny):
    """With kv_host_memory the cap counts what stays on the device per token: speculative_fetch's partial keys
    (r of 2 * head_dim per KV head), offloaded's nothing; so the same cap runs more requests at once."""
    layers, kvh, head_bytes = _head_bytes(tiny)
    token_bytes = layers * kvh * head_bytes
    partial_bytes = layers * kvh * R * 4  # float32
    cap, host = 8 * BS * token_bytes, 2**30
    base = {"num_blocks": None, "kv_cache_memory": cap}
    spec = Engine(tiny, _config(SPEC, kv_host_memory=host, **base))
    assert spec.kv.pool.num_blocks == cap // (BS * partial_bytes) == 8 * token_bytes // partial_bytes
    assert spec.kv.store.partial[0].numel() * 4 * layers <= cap  # the device part fits the cap
    offloaded = Engine(tiny, _config("offloaded", kv_host_memory=4 * cap, **base))
    assert offloaded.kv.pool.num_blocks == 4 * 8  # the host tier alone sizes it
    prompts = _prompts(lengths=(100, 90, 80, 70, 60, 50))
    peaks = {}
    for label, extra in (("cap", {}), ("host", {"kv_host_memory": host})):
        engine, requests, _ = _serve(tiny, _config(SPEC, **base, **extra), prompts)
        peaks[label] = max(s.num_running for s in engine.step_log)
        assert all(len(r.output_ids) == 24 for r in requests)
    assert peaks["cap"] < peaks["host"] == 4  # max_num_seqs


@pytest.mark.parametrize("fields", [{"strategy": "h2o:budget=0.5"}, {"strategy": None},
                                    {"kv_backend": "per_seq", "strategy": "offloaded"}])
def test_kv_host_memory_is_refused_where_no_host_tier_holds_the_pool(fields):
    with pytest.raises(KvbenchError, match="kv_host_memory"):
        EngineConfig(kv_host_memory=2**30, **fields)
