"""`kvbench serve` over real sockets on 127.0.0.1: the OpenAI routes, streaming, errors, disconnects,
/metrics, `kvbench load` end to end, and shutdown on SIGTERM.

Two fast models: synthetic:tiny (no tokenizer: text is the token ids, so a stream is compared with the
engine's tokens exactly) and `tinytok`, tiny's shape with SmolLM2's vocabulary and tokenizer, for text
prompts, chat templates and the load client (which builds its prompts as text).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kvbench.bench.records import read_records
from kvbench.cli import main
from kvbench.load.prometheus import parse_metrics
from kvbench.models import SYNTHETIC_PRESETS, load_model
from kvbench.serve import Engine, EngineConfig, FinishReason, SamplingParams
from kvbench.serve.detok import Detokenizer, StopStrings
from kvbench.serve.server import Server, ServerConfig
from kvbench.workloads.tokenizer import load_tokenizer

CONFIG = EngineConfig(block_size=4, num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64)
PROMPTS = [[5, 9, 17, 33, 2, 8, 100, 7, 44, 3], [9, 9, 9], list(range(10, 40))]


@pytest.fixture(scope="module")
def tinytok():
    SYNTHETIC_PRESETS["tinytok"] = dict(SYNTHETIC_PRESETS["tiny"], vocab_size=49152)
    try:
        lm = load_model("synthetic:tinytok", device="cpu")
    finally:
        del SYNTHETIC_PRESETS["tinytok"]
    return dataclasses.replace(lm, tokenizer=load_tokenizer("smollm2-135m"))


@contextlib.contextmanager
def serving(lm, config=CONFIG, step_log_limit=None, **server):
    """(server, engine, API root) of a server on a free port, its loop in a background thread."""
    engine = Engine(lm, config, step_log_limit)
    srv = Server(engine, ServerConfig("m", port=0, **server))
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run():
        loop.run_until_complete(srv.start())
        ready.set()
        loop.run_until_complete(srv.serve_until_stopped())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield srv, engine, f"http://127.0.0.1:{srv.port}/v1"
    finally:
        loop.call_soon_threadsafe(srv.stop)
        thread.join(30)
        assert not thread.is_alive()


def kept(engine) -> dict:
    """The requests the server makes its engine forget once answered, kept here for the test to read."""
    requests, forget = {}, engine.forget

    def keeping(request_id):
        requests[request_id] = engine.requests[request_id]
        forget(request_id)

    engine.forget = keeping
    return requests


def body(prompt, **kw):
    return {"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **kw}


def events(client, url, payload):
    """The data of each SSE event of a streamed request, JSON-decoded ([DONE] as the string)."""
    out = []
    with client.stream("POST", url, json={**payload, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def test_greedy_completions_equal_engine_generate(tiny):
    reference = Engine(tiny, CONFIG).generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    with serving(tiny) as (_, _, url), httpx.Client(timeout=30) as client:
        for prompt, ref in zip(PROMPTS, reference):
            whole = client.post(f"{url}/completions", json=body(prompt)).json()
            assert whole["choices"][0]["text"] == tiny.decode(ref.output_ids)
            assert whole["choices"][0]["finish_reason"] == "length"
            assert whole["usage"]["prompt_tokens"] == len(prompt)
            assert whole["usage"]["completion_tokens"] == 8
            streamed = events(client, f"{url}/completions", body(prompt))
            texts = [e["choices"][0]["text"] for e in streamed if isinstance(e, dict) and e["choices"]]
            assert texts == [str(t) if i == 0 else f" {t}" for i, t in enumerate(ref.output_ids)]  # one event per token


def test_stream_events_usage_and_prefix_cache_hits(tiny):
    prompt = list(range(1, 18))  # four full blocks of 4
    with serving(tiny) as (_, _, url), httpx.Client(timeout=30) as client:
        first = events(client, f"{url}/completions", body(prompt, stream_options={"include_usage": True}))
        second = events(client, f"{url}/completions", body(prompt, stream_options={"include_usage": True}))
        without = events(client, f"{url}/completions", body(prompt))
    for stream in (first, second):
        tokens, usage, done = stream[:8], stream[8], stream[9:]
        assert [e["choices"][0]["finish_reason"] for e in tokens] == [None] * 7 + ["length"]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
        assert usage["usage"]["total_tokens"] == 17 + 8
        assert done == ["[DONE]"]
    assert first[8]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second[8]["usage"]["prompt_tokens_details"]["cached_tokens"] == 16  # the full blocks
    assert len(without) == 9 and without[-1] == "[DONE]"  # no usage event unless asked


def test_no_prefix_caching_reports_no_cached_tokens(tiny):
    prompt = list(range(1, 18))
    with serving(tiny, dataclasses.replace(CONFIG, enable_prefix_caching=False)) as (_, _, url), \
            httpx.Client(timeout=30) as client:
        for _ in range(2):
            usage = client.post(f"{url}/completions", json=body(prompt)).json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_text_chat_and_stop_strings_with_a_real_tokenizer(tinytok):
    tok = tinytok.tokenizer
    with serving(tinytok) as (_, engine, url), httpx.Client(timeout=30) as client:
        requests = kept(engine)
        text = client.post(f"{url}/completions", json=body("The cache holds keys", max_tokens=12)).json()
        request = requests[0]
        assert request.prompt_ids == tinytok.encode("The cache holds keys", chat=False)
        assert text["choices"][0]["text"] == tok.decode(request.output_ids, skip_special_tokens=True).rstrip("\ufffd")
        messages = [{"role": "user", "content": "Hi there"}]
        chat = events(client, f"{url}/chat/completions", {"model": "m", "messages": messages, "max_tokens": 6,
                                                            "temperature": 0, "ignore_eos": True})
        assert chat[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chat[0]["object"] == "chat.completion.chunk" and chat[-1] == "[DONE]"
        assert requests[1].prompt_ids == tinytok.encode("Hi there", chat=True)
        assert chat[-2]["choices"][0]["finish_reason"] == "length"
        full = text["choices"][0]["text"]
        stop = full[len(full) // 2:][:3]
        cut = client.post(f"{url}/completions", json=body("The cache holds keys", max_tokens=12, stop=[stop])).json()
        assert cut["choices"][0]["text"] == full[:full.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
        stopped = 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0'
        _wait(lambda: stopped in client.get(url.removesuffix("/v1") + "/metrics").text)


@pytest.mark.parametrize("payload, status, names", [
    (b"{not json", 400, "not JSON"),
    ({"model": "m", "prompt": [1], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "m", "prompt": [1], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "m", "prompt": [1], "temperature": True}, 400, "temperature"),
    ({"model": "m", "prompt": [1] * 5000}, 400, "context window"),
    ({"model": "m", "prompt": [1], "n": 2}, 400, "n=2"),
    ({"model": "m", "prompt": [1], "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "m", "prompt": [[1], [2]]}, 400, "batch of 2"),
    ({"model": "m", "prompt": "text"}, 400, "no tokenizer"),
    ({"model": "nope", "prompt": [1]}, 404, "nope"),
])
def test_bad_requests_get_openai_errors_and_the_connection_serves_on(tiny, payload, status, names):
    with serving(tiny) as (_, _, url), httpx.Client(timeout=30) as client:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response = client.post(f"{url}/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == status
        error = response.json()["error"]
        assert names in error["message"] and error["code"] == status and error["type"]
        assert client.post(f"{url}/completions", json=body([1, 2])).status_code == 200  # same connection


def test_an_over_long_prompt_for_the_pool_is_a_400(tiny):
    with serving(tiny, dataclasses.replace(CONFIG, num_blocks=4)) as (_, _, url), httpx.Client(timeout=30) as c:
        response = c.post(f"{url}/completions", json=body(list(range(20))))
        assert response.status_code == 400 and "KV blocks" in response.json()["error"]["message"]


def _wait(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_waiting_queue_is_a_503_and_a_disconnect_frees_the_blocks(tiny):
    config = dataclasses.replace(CONFIG, max_num_seqs=1)
    with serving(tiny, config, max_waiting=1) as (srv, engine, url), httpx.Client(timeout=30) as client:
        requests = kept(engine)
        long = body(PROMPTS[2], max_tokens=800)
        with client.stream("POST", f"{url}/completions", json={**long, "stream": True}) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # the first request runs
            with httpx.Client(timeout=30) as other:
                waiting = threading.Thread(target=lambda: other.post(f"{url}/completions", json=body([1, 2, 3])))
                waiting.start()
                _wait(lambda: srv.worker.num_waiting == 1)
                refused = client.post(f"{url}/completions", json=body([4, 5]))  # on a second connection
                assert refused.status_code == 503
                assert refused.json()["error"]["type"] == "ServiceUnavailableError"
                running.close()  # the client goes away mid-stream
                waiting.join(30)
        _wait(lambda: len(requests) == 2)
        assert requests[0].finish_reason is FinishReason.ABORT
        assert len(requests[0].output_ids) < 800
        assert requests[1].finish_reason is FinishReason.LENGTH and not engine.requests
        usage = engine.kv.pool.usage()
        assert usage.used == 0 and usage.promised == 0
        engine.kv.pool.check()


def test_an_engine_failure_mid_stream_is_an_error_event_then_done(tiny, monkeypatch, capsys):
    with serving(tiny) as (_, engine, url), httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/completions", json={**body([1, 2, 3], max_tokens=200), "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")

            def broken():
                raise RuntimeError("boom")

            monkeypatch.setattr(engine, "step", broken)
            rest = [line for line in lines if line.startswith("data: ")]
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert "RuntimeError: boom" in error["message"] and error["code"] == 500 and rest[-1] == "data: [DONE]"
        monkeypatch.undo()
        assert client.post(f"{url}/completions", json=body([1, 2])).json()["choices"][0]["finish_reason"] == "length"
    assert "RuntimeError: boom" in capsys.readouterr().err  # the traceback is logged


def test_an_engine_command_that_raises_fails_its_request_and_the_thread_serves_on(tiny, monkeypatch, capsys):
    with serving(tiny) as (srv, engine, url), httpx.Client(timeout=30) as client:
        def broken(*args):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "add_request", broken)
        response = client.post(f"{url}/completions", json=body([1, 2]))
        assert response.status_code == 500 and "RuntimeError: boom" in response.json()["error"]["message"]
        monkeypatch.undo()
        monkeypatch.setattr(srv.metrics, "on_state", broken)  # the gauges, after every command and step
        assert client.post(f"{url}/completions", json=body([1, 2])).json()["choices"][0]["finish_reason"] == "length"
    assert "RuntimeError: boom" in capsys.readouterr().err


def test_a_prompt_the_per_seq_strategy_refuses_is_a_400(tiny):
    config = EngineConfig(kv_backend="per_seq", strategy="h2o:budget=0.5:window=4")
    with serving(tiny, config) as (_, _, url), httpx.Client(timeout=30) as client:
        response = client.post(f"{url}/completions", json=body(list(range(6))))
        assert response.status_code == 400 and "keeps 3 of a 6-token prompt" in response.json()["error"]["message"]
        assert client.post(f"{url}/completions", json=body(list(range(16)))).status_code == 200


def test_a_stop_string_on_the_last_token_is_counted_as_stop(tiny):
    with serving(tiny) as (_, _, url), httpx.Client(timeout=30) as client:
        whole = client.post(f"{url}/completions", json=body([1, 2, 3], max_tokens=4)).json()["choices"][0]["text"]
        cut = client.post(f"{url}/completions", json=body([1, 2, 3], max_tokens=4, stop=[whole])).json()
        assert cut["choices"][0] == {**cut["choices"][0], "text": "", "finish_reason": "stop"}
        lines = client.get(url.removesuffix("/v1") + "/metrics").text.splitlines()
    success = 'vllm:request_success_total{engine="0",finished_reason="%s",model_name="m"} 1.0'
    assert success % "length" in lines and success % "stop" in lines  # one each: the engine said length twice


def test_a_serving_engine_forgets_answered_requests_and_keeps_its_last_steps(tiny):
    with serving(tiny, step_log_limit=3) as (_, engine, url), httpx.Client(timeout=30) as client:
        for prompt in PROMPTS * 2:
            assert client.post(f"{url}/completions", json=body(prompt)).status_code == 200
        stopped = events(client, f"{url}/completions", {**body(PROMPTS[0], max_tokens=50), "stream": True, "stop": [" "]})
        assert stopped[-2]["choices"][0]["finish_reason"] == "stop"
        _wait(lambda: not engine.requests)
        steps, _ = parse_metrics(client.get(url.removesuffix("/v1") + "/metrics").text)
    assert len(engine.step_log) == 3 and [s.step for s in engine.step_log][-1] == engine.num_steps - 1
    assert steps["kvbench:engine_steps_total"] == engine.num_steps > 3


def test_serve_flags_are_engine_config_fields(capsys):
    from kvbench.cli import build_parser
    from kvbench.serve.launch import engine_config

    parse = build_parser().parse_args
    assert engine_config(parse(["serve"])) == EngineConfig()
    given = parse(["serve", "--max-num-seqs", "4", "--no-prefix-caching", "--no-chunked-prefill", "--kv-cache-memory",
                   "64MiB", "--kv-backend", "contiguous", "--admission", "reserve", "--max-model-len", "512"])
    assert engine_config(given) == EngineConfig(max_num_seqs=4, enable_prefix_caching=False, chunked_prefill=False,
                                                kv_cache_memory=64 * 2**20, kv_backend="contiguous",
                                                admission="reserve", max_model_len=512)
    assert engine_config(parse(["serve", "--swap-space", "4GiB", "--preemption", "swap"])) == EngineConfig(
        swap_space=4 * 2**30, preemption="swap")
    assert main(["serve", "--kv-backend", "nope"]) == 2  # refused before any model loads, with the valid values
    assert "kv_backend must be one of paged" in capsys.readouterr().err


def test_metrics_parse_and_counters_grow(tiny):
    prompt = list(range(1, 18))
    with serving(tiny) as (_, engine, url), httpx.Client(timeout=30) as client:
        before, types = parse_metrics(client.get(url.removesuffix("/v1") + "/metrics").text)
        for _ in range(2):
            client.post(f"{url}/completions", json=body(prompt))
        after, _ = parse_metrics(client.get(url.removesuffix("/v1") + "/metrics").text)
    grew = {k: after[k] - before.get(k, 0) for k in after}
    assert grew["vllm:prompt_tokens_total"] == 34 and grew["vllm:generation_tokens_total"] == 16
    assert grew["vllm:prefix_cache_queries_total"] == 34 and grew["vllm:prefix_cache_hits_total"] == 16
    assert grew["vllm:request_success_total"] == 2
    assert grew["vllm:time_to_first_token_seconds_count"] == 2 and grew["vllm:inter_token_latency_seconds_count"] == 14
    assert grew["kvbench:engine_steps_total"] == len(engine.step_log)
    assert all(v >= 0 for k, v in grew.items() if types.get(k.removesuffix("_total")) == "counter")
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0
    assert after["kvbench:kv_cache_blocks_total"] == CONFIG.num_blocks
    for name in ("vllm:num_requests_waiting", "vllm:num_preemptions_total", "vllm:e2e_request_latency_seconds_sum",
                 "vllm:request_queue_time_seconds_sum", "kvbench:kv_cache_bytes_used", "kvbench:kv_cache_bytes_reserved"):
        assert name in after


def test_kvbench_load_against_kvbench_serve(tinytok, tmp_path):
    with serving(tinytok) as (_, engine, url):
        requests = kept(engine)
        code = main(["load", "--url", url, "--tokenizer", "smollm2-135m", "--num-requests", "6", "--prompt-tokens", "24",
                     "--output-tokens", "5", "--ignore-eos", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    records = [r for r in read_records(tmp_path / "results.jsonl") if not r.get("warmup")]
    assert len(records) == 6 and {r["status"] for r in records} == {"ok"}
    served = [requests[i] for i in sorted(requests)][-6:]  # after the client's probe of the server
    assert sorted(r["prompt_tokens"] for r in records) == sorted(len(r.prompt_ids) for r in served)
    assert sorted(r["output_tokens"] for r in records) == sorted(len(r.output_ids) for r in served) == [5] * 6
    assert {r["usage_source"] for r in records} == {"server"}
    run = json.loads((tmp_path / "run.json").read_text())
    metrics = json.dumps(run)
    assert "vllm:generation_tokens_total" in metrics and "kvbench:engine_steps_total" in metrics


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvbench.cli", "serve", "--model", "synthetic:tiny", "--port",
                             str(port), "--num-blocks", "64", "--served-model-name", "m"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert "kvbench serve: m on" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1"
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{url}/completions", json={**body([1, 2, 3], max_tokens=300), "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]  # finished, not cut
        assert len(rest) == 299 + 1
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_detokenizer_is_incremental_and_matches_a_whole_decode():
    tok = load_tokenizer("smollm2-135m")
    text = "KV caches: naïve → paged 🚀 (日本語) done. " * 20
    ids = tok.encode(text, add_special_tokens=False)
    windows = []

    class Recording:  # the tokenizer, recording how many ids each decode gets
        def decode(self, ids, **kw):
            windows.append(len(ids))
            return tok.decode(ids, **kw)

    detok = Detokenizer(Recording(), tok.encode("Say:", add_special_tokens=False))
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert "" in pieces  # a character split over tokens waits for its last byte
    assert len(ids) > 300 and max(windows) <= 10  # each step decodes a few tokens, never the whole output


def test_detokenizer_flush_releases_a_trailing_replacement_character():
    tok = load_tokenizer("smollm2-135m")
    ids = tok.encode("Done: \ufffd\ufffd", add_special_tokens=False)  # U+FFFD is a token of its own here
    detok = Detokenizer(tok, tok.encode("Say:", add_special_tokens=False))
    pieces = [detok.push(t) for t in ids]
    assert not "".join(pieces).endswith("\ufffd")  # push cannot tell it from an incomplete character
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == "Done: \ufffd\ufffd"
    assert detok.flush() == ""


def test_stop_strings_hold_back_a_possible_start():
    stops = StopStrings(("END",))
    assert stops.feed("abcE") == ("abc", False)  # "E" is held back: it may begin END
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dxyz") == ("", True)
    free = StopStrings(("zz",))
    assert free.feed("a") == ("a", False) and free.feed("z") == ("", False) and free.flush() == "z"
    assert StopStrings(()).feed("zz") == ("zz", False)


@pytest.mark.slow
def test_embedded_model_streams_the_offline_generate_text(embedded):
    from kvbench.engine import GenerationConfig, generate
    from kvbench.strategies import build_strategy

    config = GenerationConfig(max_new_tokens=16)
    with serving(embedded, EngineConfig()) as (_, _, url), httpx.Client(timeout=120) as client:
        for question in ("What is a KV cache?", "Name three colours."):
            reference = generate(embedded, build_strategy("dynamic"), [embedded.encode(question)], config).tokens[0]
            chat = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": 16,
                    "temperature": 0, "stream_options": {"include_usage": True}}
            stream = events(client, f"{url}/chat/completions", chat)
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in stream[1:] if isinstance(e, dict)
                           and e["choices"])
            assert text == embedded.decode(reference)
            assert stream[-2]["usage"]["completion_tokens"] == len(reference)
