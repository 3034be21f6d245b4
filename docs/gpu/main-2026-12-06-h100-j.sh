#!/usr/bin/env bash
# Fifth session, first build call: m (5236c9a = main + qsplit + qcache + the prepare() upload
# fix) against merged (5840c81, the fourth session's build of main's GPU code), same call.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( 540 - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
mkdir -p /tmp/b /tmp/m && tar -C /tmp/b -xJf .device/s4/merged/cuda-bundle.tar.xz && tar -C /tmp/m -xJf .device/s5/m/cuda-bundle.tar.xz
B=/tmp/b/cuda-bundle M=/tmp/m/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; echo "merged: $(cat $B/COMMIT) m: $(cat $M/COMMIT)"; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$M/kvserve
timeout $(left 230) $M/run kvserve_tests --gtest_filter='Gpu*:-GpuKvCache.DecodeStepsMatch*' > $o/gpu-tests.log 2>&1
t "tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|row |^\[       OK" $o/gpu-tests.log | cut -c1-150 | head -60
timeout $(left 40) $M/run kvserve_tests --gtest_filter=GpuKvCache.DecodeAttentionThroughput --gtest_repeat=3 > $o/repeat.log 2>&1
t "repeat rc=$?"; grep -E "Failure|row |OK \]|FAILED  \]" $o/repeat.log
grep -hE '^\{"bench"' $o/gpu-tests.log $o/repeat.log > $o/micro.jsonl; grep -E '"(kv_quantize_pages|decode_attention)"' $o/micro.jsonl | cut -c1-230
e2e() { local name=$1 who=$2 kv=$3; shift 3; local bin=$B; [ $who = m ] && bin=$M
  local line; line=$(timeout $(left 60) $bin/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'),json.dumps({k:(v['steps'],round(v['mean_ms'],2)) for k,v in (x.get('step_times') or {}).items()}))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for kv in fp16 kivi2 kivi2c; do for who in merged m; do e2e p512n1 $who $kv $P1; done; done
t prefill
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for kv in fp16 kivi2 kivi2c; do e2e p512n128 m $kv $P512; done
e2e p512n128 merged kivi2c $P512
t p512n128
for kv in fp16 kivi2 kivi2c; do e2e capacity-gpt2 m $kv --model dummy:gpt2 --kv-pool-mb 2048 --requests 512 --concurrency 512 --prompt-len 512 --max-new-tokens 512; done
t capacity
for kv in fp16 kivi2 kivi2c; do timeout $(left 25) $M/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 32 2>/dev/null | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['kv'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; done
t decode
for kv in kivi2 kivi2c; do
timeout $(left 60) ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  $M/run kvserve bench engine --model dummy:gpt2 --device cuda --kv $kv --kv-pool-mb 4096 --requests 16 --concurrency 16 \
  --prompt-len 512 --max-new-tokens 1 --warmup-requests 0 --cuda-graphs off > $o/ncu-prefill-$kv.txt 2>&1
t "ncu $kv rc=$?"; done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
