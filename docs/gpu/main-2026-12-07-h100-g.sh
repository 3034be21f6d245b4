#!/usr/bin/env bash
# Ninth session, call a: base = 32201f7 (main); new = 48abd04 = 43980b2 (a KIVI decode step's write path in
# one launch: kv_quantize_pages quantizes an int8 window's new rows, flushes and compacts) + page_element
# reading fp8 pairs through fp8_pair_to_half2, + launchers refusing a compacted window where they read the old one.
# GPU tests of new; decode sweep (ctx 512, B = 1..256; B = 256 ctx 944) of base and new in kivi2
# and kivi2c, fp16 of new; end to end P512 N128 of both; ncu per kernel of new's kivi2c decode steps.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-540} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="base new"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s10/$w/cuda-bundle.tar.xz & done; wait
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
rc=0
tests() { local w=$1 f=$2 l=$3; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/$w-tests.log 2>&1
  rc=$?; t "$w tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte|prefill steps agree|decode steps agree|pools equal" $o/$w-tests.log | cut -c1-160; }
CHECK='GpuKvCache.MatchesTheCpu*:GpuKvCache.DecodeSteps*:GpuKvCache.PackedDecodeMatches*:GpuKvCache.PrefillSteps*:GpuKernels.LaunchersRejectBadInputs:GpuBackend.GreedyTokensMatchTheCpuBackend:GpuBackend.DecodeGraphsReplayTheEagerStepsBitForBit:GpuKvQuantizationError.*:GpuKvCache.DecodeAttentionThroughput'
tests new "$CHECK" 170
dec() { local w=$1 kv=$2; shift 2; timeout $(left 40) $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv "$@" 2>/dev/null | sed "s/^{/{\"binary\": \"$w\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'B',r['batch'],'ctx',r['context'],'%.0f tok/s'%r['tokens_per_second'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
for w in base new; do for kv in kivi2 kivi2c; do dec $w $kv --context 512; done; done
dec new fp16 --context 512
t sweep
for w in base new; do for kv in kivi2 kivi2c; do dec $w $kv --batches 256 --context 944 --steps 32; done; done
t ctx944
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 45) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for kv in kivi2c kivi2; do for w in new base; do e2e p512n128 $w $kv $P512; done; done
e2e p512n128 new fp16 $P512
t e2e
for kv in kivi2c; do
timeout $(left 60) ncu --clock-control none -k regex:'decode_attention|kv_quantize|kv_compact' --launch-count 700 --metrics gpu__time_duration.sum,launch__grid_size --csv --page raw \
  $(B new)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 4 --cuda-graphs off > $o/ncu-decode-new-$kv.csv 2>&1
t "ncu decode new $kv rc=$?"
python3 - $o/ncu-decode-new-$kv.csv <<'PY'
import csv,sys,collections
lines=[l for l in open(sys.argv[1]) if l.startswith('"')]
rows=list(csv.reader(lines))
if not rows: sys.exit()
h=rows[0]; k=h.index('Kernel Name'); g=h.index('launch__grid_size'); d=h.index('gpu__time_duration.sum')
acc=collections.defaultdict(list); print('unit', rows[1][d])
for r in rows[2:]:
    try: acc[(r[k].split('(')[0].split('::')[-1][:40], r[g])].append(float(r[d]))
    except (ValueError, IndexError): pass
for (name,grid),v in sorted(acc.items()): print(name, 'grid', grid, 'n', len(v), 'mean %.2f' % (sum(v)/len(v)), 'max %.2f' % max(v), 'last12 mean %.2f' % (sum(v[-12:])/len(v[-12:])))
PY
done
t done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
