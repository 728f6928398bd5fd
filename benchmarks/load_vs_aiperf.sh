#!/usr/bin/env bash
# kvbench load against NVIDIA AIPerf 0.13 on the same llama.cpp server (llama-cpp-python on the embedded GGUF):
# the same random workload sizes, one client after the other, then both clients' numbers side by side, with
# the CPU time each client used. Both send at a constant rate (kvbench: gamma arrivals of shape 10000, a 1%
# spread; AIPerf: --arrival-pattern constant): with Poisson arrivals each tool draws its own schedule, and on a
# one-thread server the requests that happen to bunch up queue, which moves TTFT and E2E by seconds.
#
# Needs `make setup setup-server` and AIPerf in its own venv (it needs no torch):
#   python3 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0
# Run it alone on an otherwise idle machine, never next to another benchmark:
#   flock /tmp/kvbench-cpu.lock bash benchmarks/load_vs_aiperf.sh
# Writes benchmarks/recorded/load-vs-aiperf/{kvbench,aiperf}/ and aiperf-time.txt.
#
# What to expect from the definitions (docs/serving.md, "Metric definitions"): AIPerf's inter_chunk_latency is
# kvbench's itl_ms and its inter_token_latency is kvbench's tpot_ms; AIPerf's request_latency stops at the last
# text chunk, kvbench's e2e_ms at the end of the stream; AIPerf counts output tokens by re-tokenizing the whole
# text. On a machine with few cores the clients also compete with the server: compare their CPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/recorded/load-vs-aiperf
PORT=${PORT:-8090}
THREADS=${THREADS:-1}  # llama.cpp threads; the outside comparison used 2 on a 2-core machine
RATE=${RATE:-0.5}
COUNT=${COUNT:-12}
GGUF=$(.venv/bin/python -c 'from kvbench.models import embedded_gguf; print(embedded_gguf())')
TOKENIZER=$(.venv/bin/python -c 'from kvbench.models import ensure_embedded; print(ensure_embedded())')
.venv-llamacpp/bin/python -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --host 127.0.0.1 --port "$PORT" \
    --n_ctx 2048 --n_threads "$THREADS" --n_threads_batch "$THREADS" --interrupt_requests False --verbose False \
    > /tmp/kvbench-llamacpp-aiperf.log 2>&1 &
SERVER=$!
trap 'kill $SERVER; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break; sleep 0.5; done
rm -rf "$OUT" && mkdir -p "$OUT"

# kvbench records its own CPU time per rate in run.json and summary.json
.venv/bin/kvbench load --url "http://127.0.0.1:$PORT/v1" --model smollm2 --workload random --tokenizer smollm2-135m \
    --prompt-tokens 128 --output-tokens 32 --request-rate "$RATE" --burstiness 10000 --num-requests "$COUNT" --no-progress \
    --out "$OUT/kvbench"

# AIPerf runs several processes; /usr/bin/time sums the CPU of those it waited for. With HF_HUB_OFFLINE=1
# AIPerf refuses a local tokenizer path; without it, it loads the path without the network.
env -u HF_HUB_OFFLINE /usr/bin/time -f "user_s %U system_s %S wall_s %e" -o "$OUT/aiperf-time.txt" \
    .venv-aiperf/bin/aiperf profile --model smollm2 --url "http://127.0.0.1:$PORT" --endpoint-type completions \
    --streaming --tokenizer "$TOKENIZER" --synthetic-input-tokens-mean 128 --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean 32 --output-tokens-stddev 0 --request-rate "$RATE" --arrival-pattern constant --request-count "$COUNT" \
    --random-seed 0 --ui-type simple --artifact-dir "$OUT/aiperf"

.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
kv = next(iter(json.loads((out / "kvbench" / "summary.json").read_text())["points"].values()))
ai = json.loads(next((out / "aiperf").rglob("profile_export_aiperf.json")).read_text())
rows = [("TTFT ms", "ttft_ms", "time_to_first_token"), ("TPOT ms", "tpot_ms", "inter_token_latency"),
        ("ITL ms (per chunk)", "itl_ms", "inter_chunk_latency"), ("E2E ms", "e2e_ms", "request_latency")]
print(f"{'':<20} {'kvbench mean / p50':>22} {'AIPerf mean / p50':>22}")
for name, k, a in rows:
    ours = f"{kv[k + '.mean']:.1f} / {kv[k + '.p50']:.1f}"
    theirs = f"{ai[a]['avg']:.1f} / {ai[a]['p50']:.1f}" if ai.get(a) else "-"
    print(f"{name:<20} {ours:>22} {theirs:>22}")
osl = ai.get("output_sequence_length") or {}
print(f"{'output tokens/req':<20} {kv['output_tokens'] / kv['completed']:>22.2f} {osl.get('avg', float('nan')):>22.2f}")
print(f"client CPU: kvbench {kv['client_cpu_s']:.2f} s ({100 * kv['client_cpu_share']:.1f}% of one core); "
      f"AIPerf {(out / 'aiperf-time.txt').read_text().strip()}")
PY
