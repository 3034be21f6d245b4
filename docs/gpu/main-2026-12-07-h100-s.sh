#!/usr/bin/env bash
# Thirteenth session, call s: main = dbd572b (kvserve only); new = 7bd8b20 (the write path stages
# the window as floats). new's GPU tests; decode spread 32, kivi2c and kivi2, main/new twice, fp16;
# ncu kernel times at B = 256; end to end P512 N1 and P512 N128 spread 32, main/new.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-560} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="main new"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s16/$w/cuda-bundle.tar.xz & done; wait
ln -sfn /tmp/new/cuda-bundle/lib /tmp/main/cuda-bundle/lib
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
tests() { local w=$1 f=$2 l=$3; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/tmp.log 2>&1
  local rc=$?; { echo "== $w $f rc=$rc"; cat $o/tmp.log; } >> $o/tests.log; rm -f $o/tmp.log; t "$w tests rc=$rc"; }
tests new 'Gpu*' 220
grep -E "^== |^\[  (PASSED|FAILED) |^\[  FAILED|Failure|first pool byte" $o/tests.log | cut -c1-170 | head -40
grep -A12 "RUN.*QuantizePagesThroughput" $o/tests.log | grep -i "us\|json" | head -8
dec() { local w=$1 kv=$2; shift 2; timeout $(left 40) $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv "$@" 2>/dev/null | sed "s/^{/{\"binary\": \"$w\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'B',r['batch'],'spread',r.get('context_spread'),'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
decode() { for kv in kivi2c kivi2; do for w in main new; do dec $w $kv --batches 16,64,256 --context 512 --context-spread 32; done; done; }
decode
dec new fp16 --batches 16,64,256 --context 512 --context-spread 32
t "decode pass 1"
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 45) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in main new; do for kv in kivi2c kivi2; do e2e p512n1 $w $kv $P1; done; done
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --prompt-len-spread 32 --max-new-tokens 128"
for w in main new; do for kv in kivi2c kivi2; do e2e p512n128s32 $w $kv $P512; done; done
e2e p512n128s32 new fp16 $P512
decode
t "decode pass 2"
for w in new main; do for kv in kivi2c kivi2; do
  timeout $(left 40) ncu --clock-control none -k regex:'decode_attention|kv_quantize|kv_compact' --launch-skip 600 --launch-count 150 --metrics gpu__time_duration.sum,launch__grid_size --csv --page raw \
    $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 512 --context-spread 32 --steps 12 --cuda-graphs off > $o/ncu.csv 2>&1
  echo "== ncu $w $kv rc=$?" | tee -a $o/ncu.txt
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
done; done
rm -f $o/ncu.csv; t ncu
t done
