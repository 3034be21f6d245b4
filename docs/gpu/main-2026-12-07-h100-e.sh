#!/usr/bin/env bash
# Eighth session, call a: base = 2778c8c (main); new = cdf536f = base + 9be0a0a (quantizer codes in
# float, rounded by float additions, no conversion instructions) + 92ba959 (prefill attention: int8
# window keys as codes with (scale, zero) outside the mma); lanes = 87326fb = new + 2 or 4 lanes a
# group in kv_quantize_pages where a chunk has few groups (decode flushes). Tests on lanes (on new
# too if they fail); micro benchmarks of all; P512 N1 / N128 of base and lanes, decode B = 256 of
# all, kivi2 and kivi2c; ncu per kernel of a prefill step and of decode steps.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-480} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="base new lanes"
for w in $W; do mkdir -p /tmp/$w; tar -C /tmp/$w -xJf .device/s9/$w/cuda-bundle.tar.xz & done; wait
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root
rc=0
tests() { local w=$1 f=$2 l=$3; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/$w-tests.log 2>&1
  rc=$?; t "$w tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|first pool byte|prefill steps agree|decode steps agree" $o/$w-tests.log | cut -c1-160; }
CHECK='GpuKvCache.MatchesTheCpu*:GpuKvCache.PrefillSteps*:GpuKvCache.PackedDecodeMatches*:GpuKvCache.QuantizePagesThroughput:GpuKvCache.PrefillAttentionThroughput:GpuKernels.LaunchersRejectBadInputs:GpuBackend.GreedyTokensMatchTheCpuBackend'
tests lanes "$CHECK" 190
[ $rc = 0 ] || tests new "$CHECK" 150
tests base 'GpuKvCache.QuantizePagesThroughput:GpuKvCache.PrefillAttentionThroughput' 40
tests new 'GpuKvCache.QuantizePagesThroughput' 20
for w in $W; do grep -hE '^\{"bench"' $o/$w-tests.log | sed "s/^{/{\"binary\": \"$w\", /" >> $o/micro.jsonl; done
python3 - $o/micro.jsonl <<'PY'
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l)
    if r.get('bench')=='prefill_attention':
        if r.get('kernel')!='tiled': print(r['binary'], 'attn', r['case'], r['context'], r['attention_us'])
    else:
        print(r['binary'], {k:v for k,v in r.items() if k!='binary'})
PY
dec() { timeout $(left 25) $(B $1)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $2 --batches 256 --context 944 --steps 32 2>/dev/null | sed "s/^{/{\"binary\": \"$1\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
for w in $W; do for kv in kivi2 kivi2c; do dec $w $kv; done; done
t decode
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 40) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in base lanes; do for kv in kivi2 kivi2c; do e2e p512n1 $w $kv $P1; done; done
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for w in base lanes; do for kv in kivi2 kivi2c; do e2e p512n128 $w $kv $P512; done; done
t e2e
for w in lanes base; do for kv in kivi2c kivi2; do
[ $w = base ] && [ $kv = kivi2 ] && continue
timeout $(left 50) ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  $(B $w)/run kvserve bench engine --model dummy:gpt2 --device cuda --kv $kv --kv-pool-mb 4096 --requests 16 --concurrency 16 \
  --prompt-len 512 --max-new-tokens 1 --warmup-requests 0 --cuda-graphs off > $o/ncu-prefill-$w-$kv.txt 2>&1
t "ncu $w $kv rc=$?"; awk '/^  [^ ].*\(/ {name=$0; sub(/\(.*/,"",name); sub(/.*::/,"",name)} /gpu__time_duration.sum/ {print name, $(NF-2), $(NF-1), $NF}' $o/ncu-prefill-$w-$kv.txt | grep -E 'attention|quantize|compact|dequant'
done; done
for w in lanes base; do for kv in kivi2c kivi2; do
timeout $(left 60) ncu --clock-control none -k regex:'decode_attention|kv_quantize|kv_compact' --launch-count 700 --metrics gpu__time_duration.sum,launch__grid_size --csv --page raw \
  $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 4 --cuda-graphs off > $o/ncu-decode-$w-$kv.csv 2>&1
t "ncu decode $w $kv rc=$?"
python3 - $o/ncu-decode-$w-$kv.csv <<'PY'
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
done; done
t done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
