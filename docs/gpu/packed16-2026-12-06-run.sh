#!/usr/bin/env bash
# packed16's GPU call (branch `packed16`, issue 16: the packed KIVI decode kernel reads fp8 group
# parameters, the int8 residual and value groups of 64, so kivi2c decodes with `packed`). Run from
# the checkout root as `OUT=$OUT/packed16 bash .device/packed16/run.sh`, carrying .device/model,
# .device/docs-val.txt.xz, .device/packed16 (11 MB) and .device/s3/final-bundle.tar.xz (the
# baseline bundle, main 5ee985d, 10 MB; not the whole of .device/s3). At most 150 s: every command
# gets the smaller of its own limit and what is left of 146 s. Writes 5 files to $OUT:
#   info.txt          GPU, bundles' commits, the timeline of this script
#   bench.jsonl       `kvserve bench decode` B = 256, context 944, 32 steps: kivi2 and kivi2c,
#                     baseline and branch interleaved ("build": "base" | "new")
#   tests-kvcache.log GpuKvCache.* but DecodeStepsMatch* (PackedDecodeMatchesTheCpuCacheIn-
#                     EveryTwoBitLayout, MatchesTheCpuCacheInEveryFormat, the micro-benchmark
#                     DecodeAttentionThroughput with kivi2 and kivi2c side by side, ...)
#   ppl.jsonl         eval-ppl kivi2c, 16 windows, on the GPU with the branch's bundle
#   tests-backend.log GpuBackend.*
set -uo pipefail
out=${OUT:?set OUT}
root=$PWD
mkdir -p "$out" /tmp/packed16 /tmp/packed16-base
t0=$(date +%s)
elapsed() { echo $(($(date +%s) - t0)); }
log() { echo "[$(elapsed) s] $*" | tee -a "$out/info.txt"; }
# limit SECONDS: the smaller of SECONDS and what is left of the script's 146 s (at least 1).
limit() { local left=$((146 - $(elapsed))); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
tar -C /tmp/packed16 -xJf .device/packed16/cuda-bundle.tar.xz
tar -C /tmp/packed16-base -xJf .device/s3/final-bundle.tar.xz
new=/tmp/packed16/cuda-bundle base=/tmp/packed16-base/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "branch bundle: $(cat $new/COMMIT); baseline bundle: $(cat $base/COMMIT)"; } >>"$out/info.txt"
log "unpacked"

bench() {  # who kv
  local bin; bin=$([ "$1" = base ] && echo "$base" || echo "$new")
  timeout "$(limit 25)" "$bin/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$2" \
    --batches 256 --context 944 --steps 32 | sed "s/^{/{\"build\": \"$1\", /" >>"$out/bench.jsonl"
  log "bench decode $1 $2 rc=${PIPESTATUS[0]}"
}
for kv in kivi2 kivi2c; do for who in base new; do bench "$who" "$kv"; done; done

export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$new/kvserve
timeout "$(limit 75)" "$new/run" kvserve_tests --gtest_filter='GpuKvCache.*:-GpuKvCache.DecodeStepsMatch*' \
  >"$out/tests-kvcache.log" 2>&1
log "GpuKvCache tests rc=$?"

timeout "$(limit 25)" "$new/run" kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz \
  --windows 16 --device cuda --kv kivi2c >>"$out/ppl.jsonl" 2>&1
log "eval-ppl kivi2c rc=$?"

timeout "$(limit 40)" "$new/run" kvserve_tests --gtest_filter='GpuBackend.*' \
  >"$out/tests-backend.log" 2>&1
log "GpuBackend tests rc=$?"
grep -hE "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|agree|\"bench\"" \
  "$out/tests-kvcache.log" "$out/tests-backend.log" | cut -c1-220
python3 - "$out/bench.jsonl" <<'PY' || true
import json, sys
for l in open(sys.argv[1]):
    try:
        r = json.loads(l)
    except ValueError:
        continue
    print(r["build"], r["kv"], r.get("decode_attention", "-"), "B=%d ctx=%d" % (r["batch"], r["context"]),
          "%.3f ms/step" % r["ms_per_step"], "roofline %.2f" % r["fraction_of_roofline"])
PY
log "done"
