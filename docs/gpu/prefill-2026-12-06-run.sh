#!/usr/bin/env bash
# The prefill helper's GPU call (branch `prefill`): every GPU test of the branch's bundle (the
# prefill tests and the kernel micro-benchmark GpuKvCache.PrefillAttentionThroughput among them),
# eval-ppl on the GPU (the default, tensor-core kernel), the prefill benchmark (`gpu-check.sh run --prefill`:
# `kvserve bench engine` P512 N1 of the branch with each kernel and of main 3bcd316, and
# transformers' batched forward) and ncu of the tensor-core kernel (kivi2 and fp16, one layer
# of a 16,384-token prefill step). The slow DecodeStepsMatchTheCpuCacheSplitAndUnsplit is left out.
# Carry .device/model, .device/docs-val.txt.xz, .device/prefill (the branch's bundle and this
# script) and .device/main-bundle.tar.xz; run from the checkout root with OUT set.
set -uo pipefail
out=${OUT:?}
mkdir -p /tmp/new /tmp/base
tar -C /tmp/new -xJf .device/prefill/cuda-bundle.tar.xz
tar -C /tmp/base -xJf .device/main-bundle.tar.xz
new=/tmp/new/cuda-bundle base=/tmp/base/cuda-bundle
export KVSERVE_TEST_BINARY=$new/kvserve  # the GpuFault tests start `kvserve serve`
start=$(date +%s)
timeout 235 "$new/gpu-check.sh" run --tests "Gpu*:-GpuKvCache.DecodeStepsMatch*" --ppl 16 --prefill \
  --baseline "$base" "$out"
echo "gpu-check rc=$? in $(( $(date +%s) - start )) s"
echo "branch bundle: $(cat "$new/COMMIT"); baseline bundle: $(cat "$base/COMMIT")" >>"$out/gpu.txt"
rm -f "$out/commit.txt" "$out/gpu-tests.json"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|prefill steps agree|Failure|Expected|Which is" \
  "$out/gpu-tests.log" | head -60
grep -h '"bench": "prefill_attention"' "$out/gpu-tests.log"
cat "$out/ppl.jsonl" "$out/prefill.jsonl"
if [ "${NCU:-1}" = 1 ]; then
  for kv in kivi2 fp16; do
    timeout 45 ncu --clock-control none -k regex:prefill_attention -c 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section WarpStateStats --section InstructionStats \
      "$new/run" kvserve bench engine --model dummy:gpt2 --device cuda --kv "$kv" \
      --kv-pool-mb 4096 --requests 32 --concurrency 32 --prompt-len 512 --max-new-tokens 1 \
      --max-batch-tokens 16384 --warmup-requests 0 >>"$out/ncu-prefill.txt" 2>&1
  done
  grep -E "prefill_attention_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Registers Per|Achieved Occupancy|Theoretical Occ" \
    "$out/ncu-prefill.txt"
fi
