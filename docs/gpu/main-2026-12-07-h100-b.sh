#!/usr/bin/env bash
# Seventh session, call b: four bundles in one call. main = c0fb656; nx = 91934ce (branch nextgpu:
# 16-byte int8 tile stores, kv_quantize_pages keys+values staged at once, groups balanced);
# nx2 = nx + the int8 window read as codes with (scale, zero) outside one mma, launch bounds 3
# blocks/SM; nx3 = nx2 without the 3-blocks bound. Tests on nx2 and nx3, micro benchmarks on all,
# P512 N1 / N128 end to end, ncu per-kernel of prefill (kivi2, kivi2c) and decode.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-400} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="main nx nx2 nx3"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s7/$w/cuda-bundle.tar.xz & done; wait
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root
for w in nx2 nx3; do
KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left 120) $(B $w)/run kvserve_tests --gtest_filter='GpuKvCache.MatchesTheCpu*:GpuKvCache.PrefillSteps*:GpuKvCache.QuantizePagesThroughput:GpuKvCache.PrefillAttentionThroughput:GpuKernels.LaunchersRejectBadInputs' > $o/$w-tests.log 2>&1
t "$w tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|first pool byte|^\[       OK|kivi2c .*prefill steps" $o/$w-tests.log | cut -c1-160
done
for w in main nx; do
KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left 40) $(B $w)/run kvserve_tests --gtest_filter='GpuKvCache.QuantizePagesThroughput:GpuKvCache.PrefillAttentionThroughput' > $o/$w-tests.log 2>&1
t "$w micro rc=$?"; done
for w in $W; do grep -hE '^\{"bench"' $o/$w-tests.log | sed "s/^{/{\"binary\": \"$w\", /" >> $o/micro.jsonl; done
python3 - $o/micro.jsonl <<'PY'
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l)
    if r.get('bench')=='prefill_attention' and r.get('kernel')!='tiled' and r['case'] in ('kivi2','kivi2c'):
        print(r['binary'], 'attn', r['case'], r['context'], r['attention_us'])
    elif r.get('bench')!='prefill_attention':
        print(r['binary'], {k:v for k,v in r.items() if k!='binary'})
PY
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 60) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in main nx2; do e2e p512n1 $w kivi2 $P1; done
for w in main nx nx2 nx3; do e2e p512n1 $w kivi2c $P1; done
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for w in main nx2; do e2e p512n128 $w kivi2c $P512; done; e2e p512n128 nx2 kivi2 $P512
t e2e
for w in main nx2; do for kv in kivi2 kivi2c; do
timeout $(left 60) ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  $(B $w)/run kvserve bench engine --model dummy:gpt2 --device cuda --kv $kv --kv-pool-mb 4096 --requests 16 --concurrency 16 \
  --prompt-len 512 --max-new-tokens 1 --warmup-requests 0 --cuda-graphs off > $o/ncu-prefill-$w-$kv.txt 2>&1
t "ncu $w $kv rc=$?"; awk '/^  [^ ].*\(/ {name=$0; sub(/\(.*/,"",name); sub(/.*::/,"",name)} /gpu__time_duration.sum/ {print name, $(NF-2), $(NF-1), $NF}' $o/ncu-prefill-$w-$kv.txt | grep -E 'attention|quantize|compact|dequant'
done; done
for kv in kivi2 kivi2c; do
timeout $(left 40) ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --print-summary per-kernel \
  $(B main)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 4 > $o/ncu-decode-$kv.txt 2>&1
t "ncu decode $kv rc=$?"; awk '/^  [^ ].*\(/ {name=$0; sub(/\(.*/,"",name); sub(/.*::/,"",name)} /gpu__time_duration.sum|dram__bytes_read.sum/ {print name, $1, $(NF-2), $(NF-1), $NF}' $o/ncu-decode-$kv.txt | grep -vE 'gemm|Gemm|sm90' | head -24
done
t done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
