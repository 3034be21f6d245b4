#!/usr/bin/env bash
# The kernels helper's GPU call (branch `kernels`): GPU tests of the branch's bundle (the kernel
# micro-benchmark GpuKvCache.DecodeAttentionThroughput among them), ncu of the packed kernel, and
# `kvserve bench decode` of main 7ecb016 (baseline) against the branch, interleaved, plus eval-ppl.
#   TESTS: gtest filter; NCU=0 skips ncu; run from the checkout root with OUT set.
set -uo pipefail
out=${OUT:?}
root=$PWD
mkdir -p /tmp/new /tmp/base
tar -C /tmp/new -xJf .device/kernels-bundle.tar.xz
new=/tmp/new/cuda-bundle
cp -r "$new" /tmp/base/ && xz -dc .device/base-kvserve.xz >/tmp/base/cuda-bundle/kvserve
chmod +x /tmp/base/cuda-bundle/kvserve
base=/tmp/base/cuda-bundle
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$new/kvserve
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "branch bundle: $(cat $new/COMMIT); baseline kvserve: 7ecb016"; } >"$out/gpu.txt"
cat "$out/gpu.txt"
mkdir -p /tmp/v1 && cp -r "$new" /tmp/v1/ && xz -dc .device/v1-tests.xz >/tmp/v1/cuda-bundle/kvserve_tests
chmod +x /tmp/v1/cuda-bundle/kvserve_tests
start=$(date +%s)
"$new/run" kvserve_tests --gtest_filter="${TESTS:-Gpu*:-GpuKvCache.DecodeStepsMatch*}" \
  --gtest_output="json:$out/gpu-tests.json" >"$out/gpu-tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - start )) s"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|B=256|^kivi|^fp16|Failure|Expected|Which is" "$out/gpu-tests.log" | head -40
# The first packed kernel (register prefetch, 4 blocks per SM) of the same branch, same benchmark.
/tmp/v1/cuda-bundle/run kvserve_tests --gtest_filter=GpuKvCache.DecodeAttentionThroughput \
  2>&1 | grep -E "B=256" | sed 's/^/v1 /' | tee "$out/micro-v1.txt"
bench() {  # who kv batches context [flags]
  local who=$1 bin; shift
  bin=$([ "$who" = base ] && echo "$base" || echo "$new")
  "$bin/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$1" --batches "$2" \
    --context "$3" "${@:4}" | sed "s/^{/{\"build\": \"$who\", /" >>"$out/bench.jsonl"
}
start=$(date +%s)
for who in base new; do bench $who kivi2 1,16,64,256 512; done
for who in base new; do bench $who kivi2 256 944; done
bench new kivi2 256 944 --decode-attention online
for who in base new; do bench $who fp16 256 944; done
echo "bench in $(( $(date +%s) - start )) s"
python3 - "$out/bench.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(r["build"], r["kv"], r.get("decode_attention", "-"), "B=%d ctx=%d" % (r["batch"], r["context"]),
          "%.3f ms/step" % r["ms_per_step"], "%.0f tok/s" % r["tokens_per_second"],
          "roofline %.2f" % r["fraction_of_roofline"])
PY
if [ "${NCU:-1}" = 1 ]; then
  ncu --clock-control none -k regex:decode_attention_packed -c 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section InstructionStats --section Occupancy --section LaunchStats --section WarpStateStats \
    --metrics smsp__inst_executed.sum,smsp__thread_inst_executed.sum,dram__bytes_read.sum \
    "$new/run" kvserve_tests --gtest_filter=GpuKvCache.DecodeAttentionThroughput \
    >"$out/ncu-packed.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Issue Slots Busy|Executed Instructions  |inst_executed|dram__bytes|Registers Per|Achieved Occupancy|Theoretical Occ" "$out/ncu-packed.txt"
fi
start=$(date +%s)
timeout "${SLOW_S:-100}" "$new/run" kvserve_tests --gtest_filter=GpuKvCache.DecodeStepsMatch* \
  >"$out/gpu-tests-decode-steps.log" 2>&1
echo "DecodeSteps rc=$? in $(( $(date +%s) - start )) s"; grep -E "agree|OK|FAILED|Failure" "$out/gpu-tests-decode-steps.log" | head -30
