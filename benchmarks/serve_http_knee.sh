#!/usr/bin/env bash
# 200 Poisson requests at RATE req/s from `kvbench load` to `kvbench serve` (the embedded model, max_num_seqs 16),
# open loop (no concurrency cap): every request must end ok or failed with a recorded reason, and the server
# must still answer /health afterwards. Run under the CPU lock:
#   flock /tmp/kvbench-cpu.lock benchmarks/serve_http_knee.sh RATE OUT
set -euo pipefail
RATE=${1:?requests per second}
OUT=${2:?output dir}
PORT=${PORT:-8431}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$PY -m kvbench.cli serve --port "$PORT" --max-num-seqs 16 --served-model-name smollm2-135m > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
$PY -m kvbench.cli load --url "http://127.0.0.1:$PORT/v1" --tokenizer smollm2-135m --workload random \
  --prompt-tokens 128 --output-tokens 32 --ignore-eos --num-requests "${NUM:-200}" --request-rate "$RATE" \
  --out "$OUT/load" --no-progress | tee "$OUT/load.txt"
curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && echo "server up after the run" | tee -a "$OUT/load.txt"
curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics-after.txt"
kill -TERM $SERVER
wait $SERVER && echo "server exit status 0 after SIGTERM" | tee -a "$OUT/load.txt"
trap - EXIT
