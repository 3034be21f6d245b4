#!/usr/bin/env bash
# Tenth session, call b: base = 15b3da3 (main); new2 = 052a2de (new = eb935e3, decode_attention
# takes a KIVI decode step's new rows, + the decode tests' cases in parallel and the packed test's
# aligned run, where its kernel stores the rows).
# GPU tests of new2 (decode steps, packed decode); the GPU check's decode sweep of new2 with the
# transformers baseline (fp16, kivi2, kivi2c; B = 1..256 at context 512, B = 256 at 944); end to
# end P512 N128 of base and new2.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-540} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="base new2"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s12/$w/cuda-bundle.tar.xz & done; wait
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; nproc; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
tests() { local w=$1 name=$2 f=$3 l=$4; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/$w-tests-$name.log 2>&1
  t "$w tests $name rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte|decode steps agree|pools equal|graph replays" $o/$w-tests-$name.log | cut -c1-170; }
tests new2 decode 'GpuKvCache.DecodeSteps*:GpuKvCache.PackedDecodeMatches*' 200
timeout $(left 200) $(B new2)/gpu-check.sh run --no-tests --bench $o/check > $o/check.log 2>&1
t "gpu-check bench rc=$?"
python3 -c "
import json
for l in open('$o/check/bench.jsonl'):
    r=json.loads(l); print(r.get('impl', 'kvserve'), r.get('kv'), r['batch'], r['context'], r.get('cuda_graphs'), round(r['tokens_per_second']), r.get('ms_per_step'), r.get('fraction_of_roofline'))"
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 45) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for kv in kivi2c kivi2; do for w in new2 base; do e2e p512n128 $w $kv $P512; done; done
e2e p512n128 new2 fp16 $P512
t done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
