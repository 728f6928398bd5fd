#!/usr/bin/env bash
# A recorded `kvbench load` run against llama.cpp's server (llama-cpp-python) on the embedded GGUF.
# Needs `make setup setup-server`. Run under the CPU lock:
#   flock /tmp/kvbench-cpu.lock bash benchmarks/load_llamacpp.sh
# Writes benchmarks/recorded/load-llamacpp/{sweep,prefix}/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/recorded/load-llamacpp
PORT=${PORT:-8089}
GGUF=$(.venv/bin/python -c 'from kvbench.models import embedded_gguf; print(embedded_gguf())')
.venv-llamacpp/bin/python -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --host 127.0.0.1 --port "$PORT" \
    --n_ctx 2048 --n_threads 1 --n_threads_batch 1 --interrupt_requests False --verbose False > /tmp/kvbench-llamacpp.log 2>&1 &
SERVER=$!
trap 'kill $SERVER; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break; sleep 0.5; done
rm -rf "$OUT" && mkdir -p "$OUT"
# latency against offered load: Poisson arrivals of random 128-token prompts, up to 32 new tokens
.venv/bin/kvbench load --url "http://127.0.0.1:$PORT/v1" --workload random --tokenizer smollm2-135m \
    --prompt-tokens 128 --output-tokens 32 --request-rates 0.25,0.5,1 --num-requests 12 \
    --slo ttft_ms=2000,tpot_ms=100 --no-progress --out "$OUT/sweep"
# the server's prefix cache: 3 shared 384-token prefixes x 4 questions, one request at a time
.venv/bin/kvbench load --url "http://127.0.0.1:$PORT/v1" --endpoint chat --workload prefix-repetition \
    --tokenizer smollm2-135m --prefixes 3 --suffixes 4 --prefix-tokens 384 --prompt-tokens 32 --output-tokens 16 \
    --max-concurrency 1 --no-progress --out "$OUT/prefix"
