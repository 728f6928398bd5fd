#!/usr/bin/env bash
# Does the transformers version, or kvbench's old way of passing the cache (past_key_values, deprecated in
# transformers 5.24), change decode speed? decode-micro (dynamic only: 512-token prompt, 64 new tokens, 1 warmup
# + 3 trials) alternating three configurations for 3 rounds, so drift of the machine spreads over all of them:
#   t523-new  transformers 5.23.0 (.venv-lowest, `make setup-lowest`), this kvbench
#   t524-new  transformers 5.24.0 (.venv), this kvbench
#   t524-old  transformers 5.24.0, kvbench before the model runner (OLD_SRC: src/ of a checkout of c9f6678)
# Usage: git worktree add /tmp/kvbench-old c9f6678; OLD_SRC=/tmp/kvbench-old/src benchmarks/transformers_ab.sh
# Prints one line of decode tokens/s per run; raw runs land in $OUT (default results/transformers-ab).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLD_SRC:?set OLD_SRC to the src/ of a checkout of commit c9f6678}"
OUT=${OUT:-results/transformers-ab}
mkdir -p "$OUT"
for round in 1 2 3; do
  for cfg in t523-new t524-new t524-old; do
    case $cfg in
      t523-new) python=.venv-lowest/bin/python; path= ;;
      t524-new) python=.venv/bin/python; path= ;;
      t524-old) python=.venv/bin/python; path=$OLD_SRC ;;
    esac
    PYTHONPATH=$path $python -m kvbench.cli run decode-micro --strategies dynamic --trials 3 --warmup 1 \
      --out "$OUT/$cfg-$round" --no-progress > "$OUT/$cfg-$round.log" 2>&1
    python3 -c 'import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(sys.argv[2], [round(r["decode_tokens_per_s"], 2) for r in records if not r.get("warmup")], flush=True)' \
      "$OUT/$cfg-$round/results.jsonl" "$cfg-$round"
  done
done
