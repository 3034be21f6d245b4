#!/usr/bin/env bash
# Sixth session, call c: t4 (30d0d61 = t3 + kv_quantize_residual 8 channels a lane) against t3
# (05e25f7): the tests that cover the int8 residual, P512 N1 and P512 N128 both, ncu of kivi2c.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-420} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
mkdir -p /tmp/t3 /tmp/t4 && tar -C /tmp/t3 -xJf .device/s6/t3/cuda-bundle.tar.xz & tar -C /tmp/t4 -xJf .device/s6/t4/cuda-bundle.tar.xz & wait
B() { echo /tmp/$1/cuda-bundle; }; T=$(B t4)
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; for w in t3 t4; do echo "$w: $(cat $(B $w)/COMMIT)"; done; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$T/kvserve
timeout $(left 100) $T/run kvserve_tests --gtest_filter='GpuKvCache.MatchesTheCpu*:GpuKvCache.PrefillSteps*:GpuKernels.LaunchersRejectBadInputs:GpuBackend.GreedyTokensMatchTheCpuBackend:GpuBackend.DecodeGraphsReplay*:GpuKvQuantizationError.MatchesTheCpuBackendForTheSamePrompts' > $o/t4-tests.log 2>&1
t "t4 tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|first pool byte|^\[       OK" $o/t4-tests.log | cut -c1-160 | head -20
e2e() { local name=$1 who=$2 kv=$3; shift 3
  local line; line=$(timeout $(left 60) $(B $who)/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$who\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'),json.dumps({k:(v['steps'],round(v['mean_ms'],2)) for k,v in (x.get('step_times') or {}).items()}))" "$rec"; }
P1="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1"
for w in t3 t4; do e2e p512n1 $w kivi2c $P1; done; e2e p512n1 t4 kivi2 $P1; e2e p512n1 t4 fp16 $P1
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for kv in fp16 kivi2 kivi2c; do e2e p512n128 t4 $kv $P512; done
t e2e
timeout $(left 40) ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  $T/run kvserve bench engine --model dummy:gpt2 --device cuda --kv kivi2c --kv-pool-mb 4096 --requests 16 --concurrency 16 \
  --prompt-len 512 --max-new-tokens 1 --warmup-requests 0 --cuda-graphs off > $o/ncu-prefill-kivi2c.txt 2>&1
t "ncu rc=$?"; awk '/^  [^ ].*\(/ {name=$0; sub(/\(.*/,"",name); sub(/.*::/,"",name)} /gpu__time_duration.sum/ {print name, $(NF-2), $(NF-1), $NF}' $o/ncu-prefill-kivi2c.txt | grep -E "kv_|prefill"
for kv in kivi2 kivi2c; do timeout $(left 25) $T/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 32 2>/dev/null | tee -a $o/bench.jsonl | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['kv'],'%.3f ms/step'%r['ms_per_step'],'roofline %.2f'%r['fraction_of_roofline'])"; done
t decode
cd ${OUT} && tar -czf r.tgz r && rm -rf r
