#!/usr/bin/env bash
# Ninth session, call b: v2 = 7c99845 (the one-launch write path only with an int8 residual).
# GPU tests not reached in call a, then decode B = 64, 256 (context 512) of base (32201f7) and v2.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-240} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
for w in base v2; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s11/$w/cuda-bundle.tar.xz & done; wait
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in base v2; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root
tests() { local f=$1 l=$2 n=$3; KVSERVE_TEST_BINARY=$(B v2)/kvserve timeout $(left $l) $(B v2)/run kvserve_tests --gtest_filter="$f" > $o/v2-tests-$n.log 2>&1
  t "tests $n rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte|decode steps agree|layouts" $o/v2-tests-$n.log | cut -c1-160; }
tests 'GpuKernels.LaunchersRejectBadInputs:GpuKvCache.PackedDecodeMatches*:GpuKvQuantizationError.*' 80 1
dec() { local w=$1 kv=$2; shift 2; timeout $(left 30) $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv "$@" 2>/dev/null | sed "s/^{/{\"binary\": \"$w\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'B',r['batch'],'ctx',r['context'],'%.0f tok/s'%r['tokens_per_second'],'%.3f ms/step'%r['ms_per_step'])"; }
for w in v2 base; do for kv in kivi2c kivi2; do dec $w $kv --batches 64 256 --context 512; done; done
t bench
tests 'GpuKvCache.DecodeSteps*' 200 2
t done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
