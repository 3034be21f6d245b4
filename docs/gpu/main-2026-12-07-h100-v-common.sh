# Recorded as it ran (fifteenth session, calls v-z, H100): .device/s17/common.sh, sourced by
# call v and w's scripts and by the one-line commands of calls x, y and z (docs/gpu.md,
# "Fifteenth session").
# Fourteenth session: sourced by a.sh and b.sh. main = 7bd8b20 (kvserve only: main's kernels);
# rip = residual-in-place (no compaction kernel; full bundle); win = rip + window-codes
# (decode_attention_packed scores an int8 window row from its codes; kvserve + kvserve_tests).
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-570} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
W="main rip win"
for w in $W; do mkdir -p /tmp/$w; [ -d /tmp/$w/cuda-bundle ] || tar -C /tmp/$w -xJf .device/s17/$w/cuda-bundle.tar.xz & done; wait
for w in main win; do ln -sfn /tmp/rip/cuda-bundle/lib /tmp/$w/cuda-bundle/lib; cp -n /tmp/rip/cuda-bundle/run /tmp/$w/cuda-bundle/ 2>/dev/null; done
B() { echo /tmp/$1/cuda-bundle; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for w in $W; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee -a $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
tests() { local w=$1 f=$2 l=$3; KVSERVE_TEST_BINARY=$(B $w)/kvserve timeout $(left $l) $(B $w)/run kvserve_tests --gtest_filter="$f" > $o/tmp.log 2>&1
  local rc=$?; { echo "== $w $f rc=$rc"; cat $o/tmp.log; } >> $o/tests.log; rm -f $o/tmp.log; t "$w tests rc=$rc"; }
dec() { local w=$1 kv=$2; shift 2; timeout $(left 40) $(B $w)/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv "$@" 2>/dev/null | sed "s/^{/{\"binary\": \"$w\", /" | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['binary'],r['kv'],'B',r['batch'],'spread',r.get('context_spread'),'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; }
decode() { for kv in kivi2c kivi2; do for w in main rip win; do dec $w $kv --batches 16,64,256 --context 512 --context-spread 32; done; done; }
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 45) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
ncu_layer() { local w=$1 kv=$2
  timeout $(left 40) ncu --clock-control none -k regex:'decode_attention|kv_quantize|kv_compact|kv_store' --launch-skip 600 --launch-count 150 --metrics gpu__time_duration.sum,launch__grid_size --csv --page raw \
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
  rm -f $o/ncu.csv; }
