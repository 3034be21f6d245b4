#!/usr/bin/env bash
# Lead's GPU call D (2026-12-06, second session): main after call C (whole-step error sampling,
# the LM-head padding reverted, KIVI prefix sharing if merged) against main 3bcd316: GPU tests,
# the sampler's cost, prefix caching, gRPC against in-process at concurrency 256.
set -uo pipefail
out=${OUT:?}; root=$PWD
mkdir -p /tmp/new
tar -C /tmp/new -xJf .device/lead/cuda-bundle.tar.xz
new=/tmp/new/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "new: $(cat $new/COMMIT)"; } | tee "$out/gpu.txt"
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$new/kvserve
t() { echo "[$(date +%T)] $*"; }
s=$(date +%s)
timeout 200 "$new/run" kvserve_tests --gtest_filter='Gpu*:-GpuKvCache.DecodeStepsMatch*' --gtest_output="json:$out/gpu-tests.json" > "$out/gpu-tests.log" 2>&1
t "tests rc=$? in $(( $(date +%s) - s )) s"; grep -E "^\[  (PASSED|FAILED)|^\[  FAILED|Failure" "$out/gpu-tests.log" | head -30
e2e() { local name=$1 kv=$2; shift 2
  local line; line=$(timeout 100 "$new/run" kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  echo "{\"case\":\"$name\",\"result\":${line:-null}}" >> "$out/e2e.jsonl"
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; q=x.get('kv_quantization_error',{}); print(r['case'],x.get('kv'),'rate',x.get('kv_error_sample_rate'),'out %.0f'%x.get('output_throughput',0),'samples',q.get('key',{}).get('samples'),q.get('value',{}).get('samples'))" "{\"case\":\"$name\",\"result\":${line:-null}}"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
for rate in 0 0.01 0 0.01; do e2e p512n128-rate-$rate kivi2 $P512 --kv-error-sample-rate $rate; done
t sampler
export LD_LIBRARY_PATH="$new/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export KVSERVE=$new/kvserve KVSERVE_CLI=$new/kvserve-cli KVSERVE_MODEL=$root/.device/model
MODEL=dummy:gpt2 EXTRA_FLAGS="--device cuda" POOL_MB=16384 PREFIX_LEN=512 UNIQUE_LEN=64 \
  NEW_TOKENS=128 CONCURRENCY=64 REQUESTS=128 KV_FORMATS="fp16 kivi2" timeout 150 bench/prefix.sh "$out/prefix.json" > "$out/prefix.md" 2> "$out/prefix.log"
t "prefix rc=$?"; head -20 "$out/prefix.md"
MODEL=dummy:gpt2 EXTRA_FLAGS="--device cuda" POOL_MB=16384 CONCURRENCIES="256" \
  PROMPT_LEN=512 NEW_TOKENS=128 TEMPERATURE=0 timeout 200 bench/serving.sh "$out/serving.json" > "$out/serving.md" 2> "$out/serving.log"
t "serving rc=$?"; head -20 "$out/serving.md"
