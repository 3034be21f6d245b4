#!/usr/bin/env bash
# CPU throughput of two kvserve binaries, interleaved so that both see the same machine load:
# `kvserve bench engine --device cpu` on the test model for a few shapes, with the default threads
# and with one thread, each run wrapped in /usr/bin/time for its CPU seconds (user + sys, model
# load and warm-up included).
# Usage: bench/engine_ab.sh BASE_BINARY NEW_BINARY OUT.jsonl [REPS (default 2)]
# Writes one JSON object per run: binary (base or new), threads, rep, cpu_s and the bench result.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1 new=$2 out=$3 reps=${4:-2}
shapes=("1 4 64 32" "8 16 64 32" "4 8 512 8")  # concurrency requests prompt-len max-new-tokens
times=$(mktemp)
trap 'rm -f "$times"' EXIT
: >"$out"
for rep in $(seq "$reps"); do
  for shape in "${shapes[@]}"; do
    read -r concurrency requests prompt_len new_tokens <<<"$shape"
    for threads in default 1; do
      for which in base new; do
        binary=$base
        [ "$which" = new ] && binary=$new
        one_thread=()
        [ "$threads" = 1 ] && one_thread=(OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1)
        result=$(env "${one_thread[@]}" /usr/bin/time -f '%U %S' -o "$times" "$binary" bench engine \
          --device cpu --concurrency "$concurrency" --requests "$requests" \
          --prompt-len "$prompt_len" --max-new-tokens "$new_tokens" 2>/dev/null)
        cpu=$(awk '{print $1 + $2}' "$times")
        echo "{\"binary\":\"$which\",\"threads\":\"$threads\",\"rep\":$rep,\"cpu_s\":$cpu,\"result\":$result}" >>"$out"
      done
    done
  done
done
