#!/usr/bin/env bash
# Seventh session, call d (device time nearly spent: the smallest call that decides): main =
# c0fb656; qd = main + kv_quantize_pages at 64 registers (8 blocks/SM, was 6) with KIVI chunks of
# 128 tokens where value groups of 64 left half the threads idle + kv_quantize_residual taking 4
# units a warp. Tests on qd, micro, P512 N1 / N128 end to end, ncu per kernel of the quantizers.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-400} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="main qd"
src() { [ $1 = main ] && echo .device/s7/main || echo .device/s7/c/$1; }
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf $(src $w)/cuda-bundle.tar.xz & done; wait
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root
tests() { local w=$1 f=$2 l=$3; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/$w-tests.log 2>&1
  t "$w tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte" $o/$w-tests.log | cut -c1-160; }
tests qd 'GpuKvCache.MatchesTheCpu*:GpuKvCache.PrefillSteps*:GpuKvCache.QuantizePagesThroughput' 90
tests main 'GpuKvCache.QuantizePagesThroughput' 15
for w in $W; do grep -hE '^\{"bench"' $o/$w-tests.log | sed "s/^{/{\"binary\": \"$w\", /" >> $o/micro.jsonl; done
python3 -c "
import json,sys
for l in open('$o/micro.jsonl'):
    r=json.loads(l); print(r['binary'], r['case'], 'split_us', r['split_us'], 'one_chunk_us', r['one_chunk_us'])"
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 40) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in $W; do for kv in kivi2 kivi2c; do e2e p512n1 $w $kv $P1; done; done
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for w in $W; do e2e p512n128 $w kivi2c $P512; done; e2e p512n128 qd kivi2 $P512
t e2e
for w in $W; do
timeout $(left 25) ncu --clock-control none -k regex:kv_quantize --metrics gpu__time_duration.sum --print-summary per-kernel \
  $(B $w)/run kvserve bench engine --model dummy:gpt2 --device cuda --kv kivi2c --kv-pool-mb 4096 --requests 16 --concurrency 16 \
  --prompt-len 512 --max-new-tokens 1 --warmup-requests 0 --cuda-graphs off > $o/ncu-quantize-$w-kivi2c.txt 2>&1
t "ncu $w kivi2c rc=$?"; grep -E "^  [^ ].*\(|gpu__time_duration.sum" $o/ncu-quantize-$w-kivi2c.txt | sed 's/(.*//' | cut -c1-110
done
t done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
