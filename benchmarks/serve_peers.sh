#!/usr/bin/env bash
# One workload from `kvbench load` against three servers in turn, on the embedded SmolLM2-135M-Instruct:
#   kvbench       `kvbench serve` (fp32, the default paged engine, max_num_seqs 16)
#   transformers  `transformers serve --continuous-batching` (fp32, the converted model dir kvbench loads;
#                 pages of 16, the pool kvbench's default 256 MiB holds, 512 tokens per forward)
#   llamacpp      llama-cpp-python's server on the embedded GGUF (its own quantization), as load_llamacpp.sh runs it
# Workload: kvbench load's `random` prompts of PROMPT tokens, OUTPUT tokens each; the same prompts for every
# server (seeded by rate). Phase c16: NUM requests at rate inf, at most 16 in flight. Phase poisson (unless
# RATE is empty): NUM requests at Poisson RATE req/s, open loop. EOS is ignored where the server takes
# `ignore_eos` (kvbench); transformers serve answers 422 to it (a field outside its schema) and llama-cpp-python's
# request model lacks it, so those two honour EOS (the records' output token counts say which requests stopped early).
# Each server gets one warm-up request before its runs, then SIGTERM; its exit status goes to OUT/NAME/exit.
# Needs `make setup setup-server setup-hfserve`. Run under the CPU lock, nothing else running:
#   flock /tmp/kvbench-cpu.lock benchmarks/serve_peers.sh benchmarks/recorded/serve-peers
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output dir}
NUM=${NUM:-32} PROMPT=${PROMPT:-128} OUTPUT=${OUTPUT:-64} RATE=${RATE-1}
LLAMA_THREADS=${LLAMA_THREADS:-1} PORT=${PORT:-8437}
SERVERS=${SERVERS:-kvbench transformers llamacpp}
URL="http://127.0.0.1:$PORT"
MODEL_DIR=$(.venv/bin/python -c 'from kvbench.models import ensure_embedded; print(ensure_embedded())')
GGUF=$(.venv/bin/python -c 'from kvbench.models import embedded_gguf; print(embedded_gguf())')
# pool blocks of 16 tokens in kvbench serve's default 256 MiB, for transformers' --cb-num-blocks
BLOCKS=$(.venv/bin/python -c '
from kvbench.models import model_config, kv_bytes_per_token; import torch
print(256 * 2**20 // (16 * kv_bytes_per_token(model_config("smollm2-135m"), torch.float32)))')
SERVER=

start() {  # NAME: start that server on PORT, print the model name it serves
    case $1 in
    kvbench) .venv/bin/kvbench serve --port "$PORT" --max-num-seqs 16 --served-model-name smollm2-135m \
                 > "$OUT/$1/server.log" 2>&1 &
             MODEL=smollm2-135m HEALTH=/health ;;
    transformers) .venv-hfserve/bin/transformers serve "$MODEL_DIR" --continuous-batching --dtype float32 \
                 --cb-block-size 16 --cb-num-blocks "$BLOCKS" --cb-max-batch-tokens 512 --host 127.0.0.1 \
                 --port "$PORT" > "$OUT/$1/server.log" 2>&1 &
             MODEL=$MODEL_DIR HEALTH=/health ;;
    llamacpp) .venv-llamacpp/bin/python -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --host 127.0.0.1 \
                 --port "$PORT" --n_ctx 2048 --n_threads "$LLAMA_THREADS" --n_threads_batch "$LLAMA_THREADS" \
                 --interrupt_requests False --verbose False > "$OUT/$1/server.log" 2>&1 &
             MODEL=smollm2 HEALTH=/v1/models ;;
    esac
    SERVER=$!
    for _ in $(seq 240); do curl -sf "$URL$HEALTH" > /dev/null && return; sleep 0.5; done
    echo "serve_peers: $1 did not come up; see $OUT/$1/server.log" >&2; exit 1
}

load() {  # NAME PHASE ARGS...: one kvbench load run into OUT/NAME/PHASE
    local name=$1 phase=$2; shift 2
    local eos=(); [ "$name" = kvbench ] && eos=(--ignore-eos)
    .venv/bin/kvbench load --url "$URL/v1" --model "$MODEL" --workload random --tokenizer smollm2-135m \
        --prompt-tokens "$PROMPT" --output-tokens "$OUTPUT" --num-requests "$NUM" "${eos[@]}" "$@" \
        --no-progress --out "$OUT/$name/$phase" | tee "$OUT/$name/$phase.txt"
}

trap '[ -n "$SERVER" ] && kill -TERM $SERVER 2>/dev/null; wait 2>/dev/null || true' EXIT
mkdir -p "$OUT"
{ date -u +%FT%TZ; git rev-parse --short HEAD; nproc; } > "$OUT/host.txt"
for name in $SERVERS; do
    rm -rf "${OUT:?}/$name" && mkdir -p "$OUT/$name"
    start "$name"
    curl -sf "$URL/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"model\": \"$MODEL\", \"prompt\": \"Hello\", \"max_tokens\": 4}" > "$OUT/$name/warmup.json"
    load "$name" c16 --request-rate inf --max-concurrency 16
    [ -n "$RATE" ] && load "$name" poisson --request-rate "$RATE"
    curl -sf "$URL$HEALTH" > /dev/null && echo "$name: up after the runs" | tee -a "$OUT/$name/c16.txt"
    kill -TERM "$SERVER"
    rc=0; wait "$SERVER" || rc=$?
    echo "$rc" > "$OUT/$name/exit"; SERVER=
done
KVBENCH=$PWD/.venv/bin/kvbench
for phase in c16 ${RATE:+poisson}; do  # one table per phase, columns named NAME/PHASE
    dirs=(); for name in $SERVERS; do dirs+=("$name/$phase"); done
    (cd "$OUT" && "$KVBENCH" compare "${dirs[@]}" --out "compare-$phase.md" > /dev/null)
done
