#!/usr/bin/env bash
# Lead's GPU call A: GPU tests of merged main, decode bench base (7ecb016) vs new, e2e base vs new.
set -uo pipefail
out=${OUT:?}; root=$PWD
mkdir -p /tmp/new /tmp/base
tar -C /tmp/new -xJf .device/cuda-bundle.tar.xz; tar -C /tmp/base -xJf .device/base-bundle.tar.xz
new=/tmp/new/cuda-bundle base=/tmp/base/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; echo "new: $(cat $new/COMMIT) base: $(cat $base/COMMIT)"; } | tee "$out/gpu.txt"
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$new/kvserve
s=$(date +%s)
timeout 150 "$new/run" kvserve_tests --gtest_filter='Gpu*:-GpuKvCache.DecodeStepsMatch*' --gtest_output="json:$out/gpu-tests.json" > "$out/gpu-tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - s )) s"; grep -E "^\[  (PASSED|FAILED)|^\[  FAILED|Failure" "$out/gpu-tests.log" | head -30
bench() { local who=$1 dir; shift; dir=$([ $who = base ] && echo $base || echo $new)
  timeout 60 "$dir/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$1" --batches "$2" --context "$3" 2>/dev/null | sed "s/^{/{\"build\":\"$who\",/" >> "$out/bench.jsonl"; }
s=$(date +%s)
for kv in kivi2 fp16; do for who in base new; do bench $who $kv 1,64,256 512; bench $who $kv 256 944; done; done
echo "bench in $(( $(date +%s) - s )) s"
python3 - "$out/bench.jsonl" <<'PY'
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print(r["build"],r["kv"],"B=%d ctx=%d"%(r["batch"],r["context"]),"%.3f ms"%r["ms_per_step"],"%.0f tok/s"%r["tokens_per_second"],"roof %.2f"%r.get("fraction_of_roofline",0))
PY
e2e() { local name=$1 who=$2 kv=$3; shift 3; local dir; dir=$([ $who = base ] && echo $base || echo $new)
  local line; line=$(timeout 120 "$dir/run" kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  echo "{\"case\":\"$name\",\"build\":\"$who\",\"result\":${line:-null}}" | tee -a "$out/e2e.jsonl"; }
s=$(date +%s)
for who in new base; do for kv in fp16 kivi2; do
  e2e p512n128 $who $kv --model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128; done; done
echo "p512 in $(( $(date +%s) - s )) s"
for who in new base; do for kv in fp16 kivi2; do
  e2e capacity-gpt2 $who $kv --model dummy:gpt2 --kv-pool-mb 2048 --requests 512 --concurrency 512 --prompt-len 512 --max-new-tokens 512; done; done
echo "capacity in $(( $(date +%s) - s )) s"
