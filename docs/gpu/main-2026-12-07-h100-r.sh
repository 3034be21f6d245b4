#!/usr/bin/env bash
# Twelfth session, call d: final = 3bb0868 (call c's e4m3 + the dynamic shared memory opt-in once a
# kernel, after call c's DecodeSteps test failed a kv_compact_residual launch). Every GPU test;
# decode spread 32 in kivi2c, kivi2, fp16 (one run each).
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-540} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
mkdir -p /tmp/final; tar -C /tmp/final -xJf .device/s15/final/cuda-bundle.tar.xz
B=/tmp/final/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "final: $(cat $B/COMMIT)"; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
KVSERVE_TEST_BINARY=$B/kvserve timeout $(left 200) $B/run kvserve_tests --gtest_filter='Gpu*' > $o/tests.log 2>&1
t "tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte|terminate|what\(\)" $o/tests.log | cut -c1-200
for kv in kivi2c kivi2 fp16; do
  timeout $(left 30) $B/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 16,64,256 --context 512 --context-spread 32 2>/dev/null | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['kv'],'B',r['batch'],'spread',r.get('context_spread'),'%.3f ms/step'%r['ms_per_step'])"
done
t done
