#!/usr/bin/env bash
# Eleventh session, call a: main = 6a58d51 (tenth session's tip, never run on a GPU);
# list = (950f335 + review fixes, see COMMIT) (main + 0c0f48c: a KIVI chunk's keys and values in blocks of their own + the
# write path of a decode step for its flushing items alone, decode_attention storing the others').
# GPU cache tests of list (QuantizePagesThroughput included); decode at
# context 512 spread 32 and equal (B = 16, 64, 256) main/list/main/list in kivi2c, kivi2, fp16;
# end to end P512 N128 spread 32; ncu of list's decode.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-540} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="main list"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s13/$w/cuda-bundle.tar.xz & done; wait
# main's bundle carries kvserve alone (the 64 MiB a call carries): list's libraries are the same.
ln -s /tmp/list/cuda-bundle/lib /tmp/main/cuda-bundle/lib
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
tests() { local w=$1 name=$2 f=$3 l=$4; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/$w-tests-$name.log 2>&1
  t "$w tests $name rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte|flushed some|quantize" $o/$w-tests-$name.log | cut -c1-170; }
tests list check 'GpuKvCache.DecodeSteps*:GpuKvCache.PackedDecodeMatches*:GpuKvCache.MatchesTheCpu*:GpuKvCache.PrefillSteps*:GpuKvQuantizationError.*:GpuKernels.*:GpuBackend.*:GpuKvCache.QuantizePagesThroughput' 200
dec() { local w=$1 kv=$2; shift 2; timeout $(left 40) $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv "$@" 2>/dev/null | sed "s/^{/{\"binary\": \"$w\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'B',r['batch'],'ctx',r['context'],'spread',r.get('context_spread'),'%.0f tok/s'%r['tokens_per_second'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
for kv in kivi2c kivi2; do for w in main list main list; do dec $w $kv --batches 16,64,256 --context 512 --context-spread 32; done; done
t "decode spread"
for kv in fp16; do for w in list; do dec $w $kv --batches 16,64,256 --context 512 --context-spread 32; done; done
t "decode equal"
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 45) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --prompt-len-spread 32 --max-new-tokens 128"
for w in list main; do for kv in kivi2c kivi2; do e2e p512n128s32 $w $kv $P512; done; done
e2e p512n128s32 list fp16 $P512
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in list main; do for kv in kivi2c kivi2; do e2e p512n1 $w $kv $P1; done; done
t e2e
for kv in kivi2c; do
timeout $(left 50) ncu --clock-control none -k regex:'decode_attention|kv_quantize|kv_compact' --launch-skip 600 --launch-count 150 --metrics gpu__time_duration.sum,launch__grid_size --csv --page raw \
  $(B list)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 512 --context-spread 32 --steps 12 --cuda-graphs off > $o/ncu-decode-list-$kv.csv 2>&1
t "ncu decode list $kv rc=$?"
python3 - $o/ncu-decode-list-$kv.csv <<'PY'
import csv,sys,collections
lines=[l for l in open(sys.argv[1]) if l.startswith('"')]
rows=list(csv.reader(lines))
if not rows: sys.exit()
h=rows[0]; k=h.index('Kernel Name'); g=h.index('launch__grid_size'); d=h.index('gpu__time_duration.sum')
acc=collections.defaultdict(list); print('unit', rows[1][d])
for r in rows[2:]:
    try: acc[(r[k].split('(KvCache')[0].split('::')[-1][:60], r[g])].append(float(r[d].replace(',','')))
    except (ValueError, IndexError): pass
for (name,grid),v in sorted(acc.items()): print(name, 'grid', grid, 'n', len(v), 'mean %.2f' % (sum(v)/len(v)))
PY
done
t done

