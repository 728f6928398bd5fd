#!/usr/bin/env bash
# NUM (default 200) Poisson requests at RATE req/s from `kvbench load` to `kvbench serve` (the embedded model,
# max_num_seqs 16), open loop (no concurrency cap), 128 prompt / 32 output tokens, EOS ignored. RATE may be a
# comma-separated list (a sweep to find the knee; NUM requests per rate). Then the records are checked, not the
# log: every rate has NUM records with indices 0..NUM-1, each ok or failed with a recorded reason; the server
# finished every request that came back ok (no more when all did) and holds none running or waiting and no KV
# after each rate; /health answers 200 afterwards; the server exits 0 on SIGTERM. The verdict goes to
# OUT/check.json, and the script exits 1 when it is not met.
# Run under the CPU lock:
#   flock /tmp/kvbench-cpu.lock benchmarks/serve_http_knee.sh RATE OUT
set -euo pipefail
RATE=${1:?requests per second}
OUT=${2:?output dir}
PORT=${PORT:-8431}
PY=${PY:-.venv/bin/python}
NUM=${NUM:-200}
mkdir -p "$OUT"
$PY -m kvbench.cli serve --port "$PORT" --max-num-seqs 16 --served-model-name smollm2-135m > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
$PY -m kvbench.cli load --url "http://127.0.0.1:$PORT/v1" --tokenizer smollm2-135m --workload random \
  --prompt-tokens 128 --output-tokens 32 --ignore-eos --num-requests "$NUM" --request-rates "$RATE" \
  --out "$OUT/load" --no-progress | tee "$OUT/load.txt"
HEALTH=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" || true)
curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics-after.txt" || true
kill -TERM $SERVER
EXIT=0; wait $SERVER || EXIT=$?
trap - EXIT
$PY - "$OUT" "$NUM" "$HEALTH" "$EXIT" <<'EOF'
import json, sys
from collections import Counter
from pathlib import Path

out, num, health, exit_status = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
records = [json.loads(line) for line in (out / "load/results.jsonl").read_text().splitlines() if line.strip()]
points = json.loads((out / "load/run.json").read_text())["points"]
problems, rates = [], {}
for rate, point in points.items():
    mine = [r for r in records if r["request_rate"] == rate]
    ok = sum(r["status"] == "ok" for r in mine)
    unexplained = [r["index"] for r in mine if r["status"] != "ok" and not r.get("error")]
    server = point["server_metrics"]
    finished = server["counters"].get("vllm:request_success_total")
    left = {k: server["gauges"].get(k) for k in
            ("vllm:num_requests_running", "vllm:num_requests_waiting", "kvbench:kv_cache_bytes_reserved")}
    rates[rate] = {"records": len(mine), "ok": ok, "failed": dict(Counter(r["status"] for r in mine if r["status"] != "ok")),
                   "server_finished": finished, "server_after": left}
    if sorted(r["index"] for r in mine) != list(range(num)):
        problems.append(f"rate {rate}: {len(mine)} records, indices not exactly 0..{num - 1}")
    if unexplained:
        problems.append(f"rate {rate}: failed without a reason: {unexplained}")
    # every ok request finished in the server; a failed one may or may not have reached it (a 503 did not)
    if finished is None or not ok <= finished <= len(mine) or (ok == len(mine) and finished != ok):
        problems.append(f"rate {rate}: the server finished {finished} requests, {ok} of {len(mine)} came back ok")
    if any(v != 0 for v in left.values()):
        problems.append(f"rate {rate}: the server still holds requests or KV after the run: {left}")
if health != "200":
    problems.append(f"/health answered {health} after the run")
if exit_status != 0:
    problems.append(f"the server exited {exit_status} on SIGTERM")
verdict = {"rates": rates, "health_after": health, "server_exit_status": exit_status, "problems": problems,
           "met": not problems}
(out / "check.json").write_text(json.dumps(verdict, indent=2) + "\n")
print("check: " + ("met: every request accounted for, server up after, exit 0 on SIGTERM" if not problems
                   else "NOT met: " + "; ".join(problems)))
sys.exit(0 if not problems else 1)
EOF
