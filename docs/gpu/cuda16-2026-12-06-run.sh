#!/usr/bin/env bash
# The cuda16 helper's GPU call (branch `cuda16`: fp8 group parameters and the int8 residual read
# and written by the CUDA kernels, issue 16): every GPU test of the branch's bundle but the slow
# DecodeStepsMatchTheCpuCacheSplitAndUnsplit, eval-ppl on the GPU for fp16, kivi2 and kivi2c,
# `kvserve bench decode` at B = 256, context 944 (the roofline shape of docs/gpu.md) for fp16,
# kivi2 (packed and online) and kivi2c, and `kvserve bench engine` P512 N128 (512 requests,
# concurrency 256) for kivi2 and kivi2c. Carry .device/model, .device/docs-val.txt.xz and
# .device/cuda16 (the bundle); run from the checkout root. WINDOWS (default 64) sets eval-ppl's.
set -uo pipefail
out=${OUT:?}
windows=${WINDOWS:-64}
mkdir -p /tmp/new
tar -C /tmp/new -xJf .device/cuda16/cuda-bundle.tar.xz
new=/tmp/new/cuda-bundle
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
timeout 150 "$new/gpu-check.sh" run --tests "Gpu*:-GpuKvCache.DecodeStepsMatch*" "$out"
t "gpu-check rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|Expected|Which is|pools equal|steps agree" \
  "$out/gpu-tests.log" | head -60
for kv in fp16 kivi2 kivi2c; do
  timeout 60 "$new/run" kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz \
    --windows "$windows" --device cuda --kv "$kv" | tee -a "$out/ppl.jsonl"
  t "eval-ppl $kv"
done
for args in "--kv fp16" "--kv kivi2" "--kv kivi2 --decode-attention online" "--kv kivi2c"; do
  timeout 40 "$new/run" kvserve bench decode --model dummy:gpt2 --device cuda $args \
    --batches 256 --context 944 | tee -a "$out/bench.jsonl"
  t "bench decode $args"
done
for kv in kivi2 kivi2c; do
  line=$(timeout 60 "$new/run" kvserve bench engine --model dummy:gpt2 --device cuda --kv "$kv" \
    --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128)
  echo "{\"case\":\"p512n128\",\"result\":${line:-null}}" | tee -a "$out/e2e.jsonl"
  t "bench engine $kv"
done
rm -f "$out/gpu-tests.json"
