"""`kvbench load` against llama.cpp's OpenAI-compatible server (llama-cpp-python) on the embedded GGUF.

Needs .venv-llamacpp (`make setup-server`; `make test` builds it). Skip locally with -m "not server".
"""

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from kvbench.bench.records import read_records
from kvbench.load.loadgen import run_load
from kvbench.report.load import summarize_run
from kvbench.report.run import read_run
from kvbench.bench.runner import RunOptions, run
from kvbench.load.spec import LoadSpec
from kvbench.load.stream import Endpoint
from kvbench.workloads import Request, WorkloadSpec
from kvbench.workloads.tokenizer import load_tokenizer
from kvbench.models import embedded_gguf

pytestmark = pytest.mark.server
SERVER_PYTHON = Path(__file__).resolve().parents[1] / ".venv-llamacpp" / "bin" / "python"
MODEL = "smollm2"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if not SERVER_PYTHON.exists():
        pytest.fail(f"{SERVER_PYTHON} is missing: run `make setup-server`, or deselect with -m 'not server'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(SERVER_PYTHON), "-m", "llama_cpp.server", "--model", str(embedded_gguf()),
                                 "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
                                 "--n_ctx", "2048", "--verbose", "False", "--n_threads", "1", "--n_threads_batch", "1",
                                 # one thread: llama.cpp's OpenMP threads spin, and on a shared 2-core machine a
                                 # second one made prefill 3x slower (measured); and by default a new request
                                 # aborts the running stream: queue them instead
                                 "--interrupt_requests", "False"], stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def usage_of(url: str, prompt: str, max_tokens: int) -> dict:
    """The server's own token counts for the same request, asked without streaming."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    return httpx.post(f"{url}/completions", json=body, timeout=120).json()["usage"]


def test_random_load_succeeds_and_counts_match_the_server(llama_server, tmp_path):
    out = tmp_path / "random"
    config = LoadSpec(url=llama_server, model=MODEL, workload=WorkloadSpec(prompt_tokens=48, output_tokens=12),
                        request_rates=(4.0,), num_requests=6, tokenizer="smollm2-135m", timeout_s=120)
    outcome = run(config, RunOptions(out=out, progress=False))
    assert outcome.measured == 1
    assert json.loads((out / "run.json").read_text())["complete"]
    records = read_records(out / "results.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 6
    prompts = {i: r.prompt for i, r in enumerate(_requests(config))}
    for r in records:
        assert 0 < r["ttft_ms"] < r["e2e_ms"]
        # llama-cpp-python streams no usage, so kvbench counts on the client (prompt: local tokenizer,
        # output: text chunks); the counts must
        # equal what the server reports for the same (greedy) request without streaming
        assert r["usage_source"] == "client"
        usage = usage_of(llama_server, prompts[r["index"]], 12)
        assert (r["prompt_tokens"], r["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    info = json.loads((out / "run.json").read_text())
    assert info["points"]["4"]["server_metrics"] == {"available": False}  # llama-cpp-python has no /metrics


# prompts the embedded model continues in kind: greedy, it answers 11 stars (33 tokens, 11 chunks) and CJK text
# (32 tokens, 18 chunks)
MULTI_BYTE = {"emoji": "⭐⭐⭐⭐⭐⭐⭐⭐⭐⭐⭐⭐", "cjk": "東京、大阪、京都、名古屋、札幌、福岡、神戸、横浜、"}


@pytest.mark.parametrize("kind", MULTI_BYTE)
def test_multi_byte_output_counts_equal_the_servers(llama_server, kind):
    """llama-cpp-python sends the tokens of one emoji or CJK character in one chunk and streams no usage:
    kvbench's client count must still equal the server's count of the same greedy request."""
    records = []
    request = Request(0, ({"role": "user", "content": MULTI_BYTE[kind]},), max_tokens=32)
    asyncio.run(run_load(Endpoint(llama_server, MODEL, timeout_s=120), [request], [0.0], records.append,
                         tokenizer=load_tokenizer("smollm2-135m")))
    record, = records
    server = usage_of(llama_server, request.prompt, 32)["completion_tokens"]
    assert record["status"] == "ok" and record["output_tokens_by"] == "tokenizer"
    chunks = len(record["itl_ms"]) + 1
    assert chunks < server  # several tokens per chunk: one per chunk would undercount
    assert record["output_tokens"] == server


def _requests(config: LoadSpec):
    from kvbench.workloads import build_requests

    return build_requests(config.workload, config.num_requests, load_tokenizer(config.tokenizer), form="text")


def test_prefix_repetition_shows_the_servers_prefix_cache_in_ttft(llama_server, tmp_path):
    out = tmp_path / "prefix"
    workload = WorkloadSpec(kind="prefix-repetition", prefixes=2, suffixes=3, prefix_tokens=384, prompt_tokens=16,
                            output_tokens=4)
    # one request at a time: llama-cpp-python keeps the previous request's KV and reuses its common prefix
    config = LoadSpec(url=llama_server, model=MODEL, endpoint="chat", workload=workload, max_concurrency=1,
                        tokenizer="smollm2-135m", timeout_s=120)
    run(config, RunOptions(out=out, progress=False))
    point = summarize_run(read_run(out))["points"]["inf"]
    assert point["completed"] == 6 and point["failed"] == 0
    # a behaviour check within one run: prefilling a new 384-token prefix must cost clearly more
    # than reusing one that the server still holds
    assert point["ttft_new_over_shared"] > 1.5, point
