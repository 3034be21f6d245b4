#!/usr/bin/env bash
# Sixth session, call a: t (int8tile + staged kv_quantize_pages, 9b0cc2d) against c (main,
# 756ad0f) and m (5236c9a, before residual slots), same call. No model carried: kernel tests only.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-420} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
for w in m c t; do mkdir -p /tmp/$w; done
tar -C /tmp/m -xJf .device/s5/m/cuda-bundle.tar.xz & tar -C /tmp/c -xJf .device/s6/c/cuda-bundle.tar.xz & tar -C /tmp/t -xJf .device/s6/t/cuda-bundle.tar.xz & wait
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; for w in m c t; do echo "$w: $(cat /tmp/$w/cuda-bundle/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root
B() { echo /tmp/$1/cuda-bundle; }
KVSERVE_TEST_BINARY=$(B t)/kvserve timeout $(left 120) $(B t)/run kvserve_tests --gtest_filter='GpuKvCache.*:GpuKernels.LaunchersRejectBadInputs:GpuKernels.DecodeAttentionRunsPacked*' > $o/t-tests.log 2>&1
t "t tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|first pool byte|^\[       OK" $o/t-tests.log | cut -c1-160 | head -40
KVSERVE_TEST_BINARY=$(B c)/kvserve timeout $(left 40) $(B c)/run kvserve_tests --gtest_filter='GpuKvCache.QuantizePagesThroughput:GpuKvCache.PrefillAttentionThroughput' > $o/c-tests.log 2>&1
t "c micro rc=$?"
for w in c t; do grep -hE '^\{"bench"' $o/$w-tests.log | sed "s/^{/{\"binary\": \"$w\", /" >> $o/micro.jsonl; done
grep -E 'kv_quantize_pages|prefill_attention' $o/micro.jsonl | cut -c1-230
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 60) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'),json.dumps({k:(v['steps'],round(v['mean_ms'],2)) for k,v in (x.get('step_times') or {}).items()}))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in c t; do for kv in kivi2 kivi2c; do e2e p512n1 $w $kv $P1; done; done; e2e p512n1 t fp16 $P1
t prefill
dec() { timeout $(left 25) $(B $1)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $2 --batches 256 --context 944 --steps 32 2>/dev/null | sed "s/^{/{\"binary\": \"$1\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
for i in 1 2; do for w in m c t; do dec $w kivi2; done; done; for w in c t; do dec $w kivi2c; done
t decode
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for kv in fp16 kivi2 kivi2c; do e2e p512n128 t $kv $P512; done; e2e p512n128 c kivi2c $P512
t p512n128
CAP="--model dummy:gpt2 --kv-pool-mb 2048 --requests 512 --concurrency 512 --prompt-len 512 --max-new-tokens 512"
for w in m c t; do e2e capacity $w kivi2 $CAP; done; e2e capacity t kivi2c $CAP
t capacity
cd ${OUT} && tar -czf r.tgz r && rm -rf r
