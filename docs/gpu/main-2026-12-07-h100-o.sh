#!/usr/bin/env bash
# Twelfth session, call a: main = b8f02ce (for_each_flushing_unit, never run on a GPU);
# c512 = main + kv_compact_residual at 512 threads a block. main's cache tests; decode at context
# 512 spread 32 (B = 16, 64, 256) main/c512/main/c512 in kivi2c and kivi2; ncu --set full of one
# decode step's three KV kernels (kivi2c, kivi2) on main; c512's cache tests if time is left.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-540} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="main c512"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s15/$w/cuda-bundle.tar.xz & done; wait
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root
tests() { local w=$1 name=$2 f=$3 l=$4; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/$w-tests-$name.log 2>&1
  t "$w tests $name rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte" $o/$w-tests-$name.log | cut -c1-170; }
CACHE='GpuKvCache.DecodeSteps*:GpuKvCache.PackedDecodeMatches*:GpuKvCache.MatchesTheCpu*:GpuKvCache.PrefillSteps*:GpuKernels.LaunchersRejectBadInputs'
tests main cache "$CACHE" 150
dec() { local w=$1 kv=$2; shift 2; timeout $(left 40) $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv "$@" 2>/dev/null | sed "s/^{/{\"binary\": \"$w\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'B',r['batch'],'ctx',r['context'],'spread',r.get('context_spread'),'%.0f tok/s'%r['tokens_per_second'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
for kv in kivi2c kivi2; do for w in main c512 main c512; do dec $w $kv --batches 16,64,256 --context 512 --context-spread 32; done; done
t "decode spread"
for kv in kivi2c kivi2; do
  timeout $(left 100) ncu --set full --import-source yes -k regex:'decode_attention|kv_quantize|kv_compact' --launch-skip 600 --launch-count 3 -o $o/full-$kv \
    $(B main)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 512 --context-spread 32 --steps 8 --cuda-graphs off > $o/ncu-full-$kv.log 2>&1
  t "ncu full $kv rc=$?"
  ncu --import $o/full-$kv.ncu-rep --page details > $o/full-$kv-details.txt 2>&1
  ncu --import $o/full-$kv.ncu-rep --page source --csv --print-source sass > $o/full-$kv-sass.csv 2>&1
  ncu --import $o/full-$kv.ncu-rep --page source --csv --print-source cuda > $o/full-$kv-cuda.csv 2>&1
  ls -la $o/full-$kv*; grep -E "^  [a-z_]+.*\(|Duration|Achieved Occupancy|Registers Per|Memory Throughput" $o/full-$kv-details.txt | head -40
done
tests c512 cache "$CACHE" 150
t done
