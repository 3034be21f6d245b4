#!/usr/bin/env bash
# Sixth session, call b: t3 (t + rint_quotient + keys then values staged) with the model: its GPU tests, the kernel
# micro benchmarks (t's quantize micro too), P512 N1 t vs t3, ncu of one prefill step per kivi
# format, kivi2c eval-ppl over 64 windows.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-420} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
mkdir -p /tmp/t /tmp/t3 && tar -C /tmp/t -xJf .device/s6/t/cuda-bundle.tar.xz & tar -C /tmp/t3 -xJf .device/s6/t3/cuda-bundle.tar.xz & wait
B() { echo /tmp/$1/cuda-bundle; }; T=$(B t3)
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; for w in t t3; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 60) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'),json.dumps({k:(v['steps'],round(v['mean_ms'],2)) for k,v in (x.get('step_times') or {}).items()}))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in t t3; do for kv in kivi2 kivi2c; do e2e p512n1 $w $kv $P1; done; done
t prefill
for kv in kivi2 kivi2c; do
timeout $(left 70) ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  $T/run kvserve bench engine --model dummy:gpt2 --device cuda --kv $kv --kv-pool-mb 4096 --requests 16 --concurrency 16 \
  --prompt-len 512 --max-new-tokens 1 --warmup-requests 0 --cuda-graphs off > $o/ncu-prefill-$kv.txt 2>&1
t "ncu $kv rc=$?"; grep -E "^  [a-z_ ]*void|gpu__time_duration" $o/ncu-prefill-$kv.txt | paste - - | sed -E 's/\(KvCacheView.*//; s/ +/ /g' | cut -c1-150; done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
