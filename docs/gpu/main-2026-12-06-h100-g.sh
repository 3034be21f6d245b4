#!/usr/bin/env bash
# Fourth session's GPU call: `merged` (main d0fdee2 + epilogue f0c6d41 + packed16 5bff722) against
# base (final-bundle: main's code 5ee985d), same call.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( 560 - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
mkdir -p /tmp/b /tmp/m && tar -C /tmp/b -xJf .device/s3/final-bundle.tar.xz && tar -C /tmp/m -xJf .device/s4/merged/cuda-bundle.tar.xz
B=/tmp/b/cuda-bundle M=/tmp/m/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; echo "base: $(cat $B/COMMIT) merged: $(cat $M/COMMIT)"; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$M/kvserve
timeout $(left 170) $M/run kvserve_tests --gtest_filter='Gpu*:-GpuKvCache.DecodeStepsMatch*' > $o/gpu-tests.log 2>&1
t "tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|near tie|^\[       OK" $o/gpu-tests.log | cut -c1-150 | head -60
grep -E '^\{"bench"' $o/gpu-tests.log > $o/micro.jsonl; wc -l < $o/micro.jsonl
for kv in fp16 kivi2 kivi2c; do for who in base merged; do
  [ $who = base ] && [ $kv = kivi2c ] && continue
  bin=$B; [ $who = merged ] && bin=$M
  timeout $(left 25) $bin/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 32 2>/dev/null | sed "s/^{/{\"build\": \"$who\", /" >> $o/bench.jsonl
done; done
python3 -c "
import json
for l in open('$o/bench.jsonl'):
    r=json.loads(l); print(r['build'],r['kv'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"
t decode
e2e() { local name=$1 who=$2 kv=$3; shift 3; local bin=$B; [ $who = merged ] && bin=$M
  local line; line=$(timeout $(left 60) $bin/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'pre',x.get('preemptions'),'cap',x.get('graph_captures'),json.dumps({k:(v['steps'],round(v['mean_ms'],2)) for k,v in (x.get('step_times') or {}).items()}))" "$rec"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for kv in fp16 kivi2; do for who in base merged; do e2e p512n128 $who $kv $P512; done; done
e2e p512n128 merged kivi2c $P512
t p512n128
for kv in fp16 kivi2 kivi2c; do e2e capacity-gpt2 merged $kv --model dummy:gpt2 --kv-pool-mb 2048 --requests 512 --concurrency 512 --prompt-len 512 --max-new-tokens 512; done
t capacity
for args in "--kv fp16" "--kv kivi2" "--kv kivi2c" "--kv kivi2 --kv-value-group 64 --kv-params fp8" "--kv kivi2 --kv-value-group 64 --kv-residual-format int8"; do
  s0=$(date +%s%N); timeout $(left 40) $M/run kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz --windows 64 --device cuda $args 2>/dev/null | tee -a $o/ppl.jsonl | cut -c1-150; echo "  $args: $(( ($(date +%s%N) - s0) / 1000000 )) ms"; done
t ppl
timeout $(left 90) python3 $M/hf_generate.py --cases 256x512x128 2> $o/hf-generate.log | tee -a $o/e2e.jsonl
t hf
if [ $(left 60) -ge 50 ]; then
timeout $(left 60) ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  $M/run kvserve bench engine --model dummy:gpt2 --device cuda --kv kivi2 --kv-pool-mb 4096 --requests 64 --concurrency 64 \
  --prompt-len 512 --max-new-tokens 3 --warmup-requests 0 --cuda-graphs off > $o/ncu-mixed-kivi2.txt 2>&1
t "ncu mixed rc=$?"; fi
cd ${OUT} && tar -czf r.tgz r && rm -rf r
