#!/usr/bin/env bash
# Lead's final GPU call (2026-12-06, third session): merged main (mixed-step split, KIVI snapshots
# only for shared prefixes, cuda16's fp8 parameters and int8 residual, the near-tie greedy test):
# GPU tests, issue 15's end-to-end table with its transformers peer, issue 16's kivi2c on the GPU.
set -uo pipefail
out=${OUT:?}; root=$PWD; o=$out
mkdir -p /tmp/f && tar -C /tmp/f -xJf .device/s3/final-bundle.tar.xz; N=/tmp/f/cuda-bundle
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "bundle: $(cat $N/COMMIT)"; } | tee $o/gpu.txt
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$N/kvserve
timeout 110 $N/run kvserve_tests --gtest_filter='Gpu*:-GpuKvCache.DecodeStepsMatch*:GpuKvCache.*Throughput' > $o/gpu-tests.log 2>&1
t "tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|near tie" $o/gpu-tests.log | head -30
e2e() { local name=$1 kv=$2; shift 2
  local line; line=$(timeout 60 $N/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $o/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'pre',x.get('preemptions'),json.dumps({k:(v['steps'],round(v['mean_ms'],3)) for k,v in (x.get('step_times') or {}).items()}))" "$rec"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for kv in fp16 kivi2 kivi2c; do e2e p512n128 $kv $P512; done
t p512n128
for kv in fp16 kivi2; do e2e capacity-gpt2 $kv --model dummy:gpt2 --kv-pool-mb 2048 --requests 512 --concurrency 512 --prompt-len 512 --max-new-tokens 512; done
for kv in fp16 kivi2; do e2e p512n1 $kv --model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 1; done
t capacity+prefill
for kv in fp16 kivi2 kivi2c; do timeout 30 $N/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 32 2>/dev/null | tee -a $o/bench.jsonl | cut -c1-200; done
t decode
for args in "--kv kivi2 --kv-params fp8" "--kv kivi2 --kv-residual-format int8"; do timeout 30 $N/run kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz --windows 16 --device cuda $args 2>/dev/null | tee -a $o/ppl.jsonl | cut -c1-200; done
t ppl
timeout 70 python3 $N/hf_generate.py --cases 256x512x128 2> $o/hf-generate.log | tee -a $o/e2e.jsonl
t hf
