#!/usr/bin/env bash
# Cost and readings of the sampled KV quantization error (docs/design.md section 6.1) on the CPU:
# `kvserve bench engine --device cpu` on the test model at --kv-error-sample-rate 0, 0.01 (the
# default) and 1, interleaved so that every rate sees the same machine load, one thread, each run
# under /usr/bin/time for its CPU seconds (user + sys: model load and warm-up included); then one
# run at rate 1 per quantized format for the error it reads (the alert's threshold).
# Usage: bench/kv_error_cost.sh BINARY OUT.jsonl [REPS (default 3)]
# Writes one JSON object per run: kv, rate, rep, cpu_s and the bench result.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$1 out=$2 reps=${3:-3}
shape=(--requests 8 --concurrency 4 --prompt-len 256 --max-new-tokens 64)
times=$(mktemp)
trap 'rm -f "$times"' EXIT
: >"$out"
run() {  # kv rate rep
  local result cpu
  result=$(OMP_NUM_THREADS=1 /usr/bin/time -f '%U %S' -o "$times" "$binary" bench engine \
    --device cpu --kv "$1" --kv-error-sample-rate "$2" "${shape[@]}" 2>/dev/null)
  cpu=$(awk '{print $1 + $2}' "$times")
  echo "{\"kv\":\"$1\",\"rate\":$2,\"rep\":$3,\"cpu_s\":$cpu,\"result\":$result}" >>"$out"
}
for rep in $(seq "$reps"); do
  for rate in 0 0.01 1; do run kivi2 "$rate" "$rep"; done
done
for kv in kivi4 int8; do run "$kv" 1 1; done
