#!/usr/bin/env bash
# Twelfth session, call c: staged = 06926f9 (call b's: the write path's rows looked up once a row,
# the listed quantize kernel KIVI-only at 128 registers); e4m3 = staged + e4m3 codes read off a
# float's bits in the fp8 pair search (kernels/e4m3_rounding.h). e4m3's cache and kernel tests;
# decode spread 32 in kivi2c staged/e4m3 twice; ncu times of e4m3's decode kernels; ncu --set full
# of one listed kv_quantize_pages launch (kivi2c); end to end P512 N1 and P512 N128 spread 32.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-540} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="staged e4m3"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s15/$w/cuda-bundle.tar.xz & done; wait
# staged's bundle carries kvserve alone (the 64 MiB a call carries): e4m3's libraries are the same.
ln -s /tmp/e4m3/cuda-bundle/lib /tmp/staged/cuda-bundle/lib
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root
KVSERVE_TEST_BINARY=$(B e4m3)/kvserve timeout $(left 150) $(B e4m3)/run kvserve_tests \
  --gtest_filter='GpuKvCache.*:GpuKernels.*:-GpuKvCache.DecodeAttentionThroughput:GpuKvCache.PrefillAttentionThroughput:GpuKernels.BiasGemmThroughput:GpuKernels.LayerNormThroughput' > $o/tests.log 2>&1
t "e4m3 tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte|\"bench\"" $o/tests.log | cut -c1-200
dec() { local w=$1 kv=$2; shift 2; timeout $(left 40) $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv "$@" 2>/dev/null | sed "s/^{/{\"binary\": \"$w\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'B',r['batch'],'spread',r.get('context_spread'),'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
for w in staged e4m3 staged e4m3; do dec $w kivi2c --batches 16,64,256 --context 512 --context-spread 32; done
t "decode spread"
timeout $(left 40) ncu --clock-control none -k regex:'decode_attention|kv_quantize|kv_compact' --launch-skip 600 --launch-count 150 --metrics gpu__time_duration.sum,launch__grid_size --csv --page raw \
  $(B e4m3)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv kivi2c --batches 256 --context 512 --context-spread 32 --steps 12 --cuda-graphs off > $o/ncu.csv 2>&1
echo "== ncu e4m3 kivi2c rc=$?" | tee $o/ncu.txt
python3 - $o/ncu.csv <<'PY' | tee -a $o/ncu.txt
import csv,sys,collections
lines=[l for l in open(sys.argv[1]) if l.startswith('"')]
rows=list(csv.reader(lines))
if not rows: sys.exit()
h=rows[0]; k=h.index('Kernel Name'); g=h.index('launch__grid_size'); d=h.index('gpu__time_duration.sum')
acc=collections.defaultdict(list)
for r in rows[2:]:
    try: acc[(r[k].split('(KvCache')[0].split('::')[-1][:60], r[g])].append(float(r[d].replace(',','')))
    except (ValueError, IndexError): pass
for (name,grid),v in sorted(acc.items()): print(name, 'grid', grid, 'n', len(v), 'mean %.2f us' % (sum(v)/len(v)/1000))
PY
rm -f $o/ncu.csv
timeout $(left 60) ncu --set full --import-source yes -k regex:'kv_quantize_pages' --launch-skip 250 --launch-count 1 -o /tmp/full \
  $(B e4m3)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv kivi2c --batches 256 --context 512 --context-spread 32 --steps 8 --cuda-graphs off > /dev/null 2>&1
t "ncu full rc=$?"
ncu --import /tmp/full.ncu-rep --page details > $o/full-details.txt 2>&1
ncu --import /tmp/full.ncu-rep --page source --csv --print-source sass 2>&1 | xz > $o/full-sass.csv.xz
grep -E "^  [a-z_ ]+.*\(|Duration|Registers Per|Achieved Occ" $o/full-details.txt | head
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 45) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in staged e4m3; do e2e p512n1 $w kivi2c $P1; done
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --prompt-len-spread 32 --max-new-tokens 128"
for w in staged e4m3; do e2e p512n128s32 $w kivi2c $P512; done
e2e p512n128s32 e4m3 kivi2 $P512
t done
