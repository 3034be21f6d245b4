#!/usr/bin/env bash
# Tenth session, call e: final = 0a2096c (what lands: decode_attention takes a KIVI decode step's
# new rows; kv_compact_residual 8 channels at a time; the online kernel's int8 window in one load;
# bench decode --context-spread; 2 or 4 lanes a group in a decode step's flush).
# The backend's GPU tests; the GPU check's decode sweep (fp16, kivi2, kivi2c, transformers); the
# same formats at contexts spread over 32 tokens; end to end P512 N128 of the three formats.
set -uo pipefail
o=${OUT:?}/r; mkdir -p $o; root=$PWD
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { local l=$(( ${BUDGET:-540} - ($(date +%s) - T0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
mkdir -p /tmp/final && tar -C /tmp/final -xJf .device/s12/final/cuda-bundle.tar.xz
B=/tmp/final/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "final: $(cat $B/COMMIT)"; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
KVSERVE_TEST_BINARY=$B/kvserve timeout $(left 60) $B/run kvserve_tests --gtest_filter='GpuBackend.GreedyTokensMatchTheCpuBackend:GpuBackend.DecodeGraphsReplayTheEagerStepsBitForBit:GpuBackend.LogitsAreCloseToTheCpuBackend' > $o/tests.log 2>&1
t "tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|^\[       OK|Failure|graph replays" $o/tests.log | cut -c1-170
timeout $(left 120) $B/gpu-check.sh run --no-tests --bench $o/check > $o/check.log 2>&1
t "gpu-check bench rc=$?"
for kv in fp16 kivi2 kivi2c; do timeout $(left 40) $B/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --context 512 --context-spread 32 2>/dev/null >> $o/check/bench.jsonl; done
t spread
python3 -c "
import json
for l in open('$o/check/bench.jsonl'):
    r=json.loads(l); print(r.get('impl', 'kvserve'), r.get('kv'), r['batch'], r['context'], r.get('context_spread'), r.get('cuda_graphs'), round(r['tokens_per_second']), r.get('ms_per_step'), r.get('fraction_of_roofline'))"
e2e() { local name=$1 kv=$2; shift 2
  local line; line=$(timeout $(left 45) $B/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"final\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'))" "$rec"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for i in 1 2; do for kv in kivi2c kivi2 fp16; do e2e p512n128 $kv $P512; done; done
t done
cd ${OUT} && tar -czf r.tgz r && rm -rf r
