#!/usr/bin/env bash
# The prefill2 helper's GPU call (branch `prefill2`: int8/KIVI pages of long prefill items
# dequantized once per layer by kv_dequantize_pages, then read by prefill_attention as fp16 tiles):
# every GPU test of the branch's bundle but the slow DecodeStepsMatchTheCpuCacheSplitAndUnsplit
# (PrefillAttentionThroughput, the kernel micro-benchmark, among them), eval-ppl on the GPU (16
# windows), the prefill benchmark (`gpu-check.sh run --prefill`: `kvserve bench engine` P512 N1
# of the branch with each kernel, of today's main (5bdaa8e plus the branch's compile fix of
# tools/bench_engine.cc: the tensor kernel without the scratch) as --baseline, and transformers'
# batched forward), the same kvserve runs of main 3bcd316 (before the tensor kernel), and ncu of
# the kivi2 layer's two kernels and the fp16 one.
# Carry .device/model, .device/docs-val.txt.xz, .device/prefill2 (the branch's bundle, today's
# main's stripped kvserve alone, which borrows the branch bundle's libraries, and this script) and
# .device/main-bundle.tar.xz; run from the checkout root.
set -uo pipefail
out=${OUT:?}
mkdir -p /tmp/new /tmp/today /tmp/old
tar -C /tmp/new -xJf .device/prefill2/cuda-bundle.tar.xz
tar -C /tmp/today -xJf .device/prefill2/main-today-bundle.tar.xz
mkdir -p /tmp/today/cuda-bundle
cp -r /tmp/new/cuda-bundle/lib /tmp/new/cuda-bundle/run /tmp/today/cuda-bundle/
cp /tmp/today/main-today/kvserve /tmp/today/main-today/COMMIT /tmp/today/cuda-bundle/
tar -C /tmp/old -xJf .device/main-bundle.tar.xz
new=/tmp/new/cuda-bundle today=/tmp/today/cuda-bundle old=/tmp/old/cuda-bundle
export KVSERVE_TEST_BINARY=$new/kvserve KVSERVE_TEST_SOURCE_DIR=$PWD
start=$(date +%s)
timeout 200 "$new/gpu-check.sh" run --tests "Gpu*:-GpuKvCache.DecodeStepsMatch*" --ppl 16 --prefill \
  --baseline "$today" "$out"
echo "gpu-check rc=$? in $(( $(date +%s) - start )) s"
for kv in fp16 kivi2; do
  line=$("$old/run" kvserve bench engine --model dummy:gpt2 --device cuda --kv "$kv" \
    --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 \
    --max-new-tokens 1 --max-batch-tokens 16384)
  echo "{\"case\":\"p512n1\",\"binary\":\"main-3bcd316\",\"result\":${line:-null}}" |
    tee -a "$out/prefill.jsonl"
done
echo "branch bundle: $(cat "$new/COMMIT"); --baseline (today's main): $(cat "$today/COMMIT"); old main: $(cat "$old/COMMIT")" >>"$out/gpu.txt"
rm -f "$out/commit.txt" "$out/gpu-tests.json"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|prefill steps agree|Failure|Expected|Which is" \
  "$out/gpu-tests.log" | head -60
grep -h '"bench": "prefill_attention"' "$out/gpu-tests.log"
cat "$out/ppl.jsonl"
python3 - "$out/prefill.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    res = r.get("result") or r
    print(r.get("binary", r.get("impl")), res.get("kv", ""), res.get("prefill_attention", ""),
          round(res.get("prompt_throughput", 0)))
PY
for kv in kivi2 fp16; do
  timeout 40 ncu --clock-control none -k regex:"prefill_attention|kv_dequantize_pages" -c 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    "$new/run" kvserve bench engine --model dummy:gpt2 --device cuda --kv "$kv" \
    --kv-pool-mb 4096 --requests 32 --concurrency 32 --prompt-len 512 --max-new-tokens 1 \
    --max-batch-tokens 16384 --warmup-requests 0 >>"$out/ncu-prefill.txt" 2>&1
done
grep -E "prefill_attention_kernel|kv_dequantize_pages_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy" \
  "$out/ncu-prefill.txt"
echo "total $(( $(date +%s) - start )) s"
