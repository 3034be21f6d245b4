#!/usr/bin/env bash
# Lead's GPU call C (2026-12-06, second session): merged main (final + qerr + prefill + prefix +
# kvfmt) against main 3bcd316 in the same call: GPU tests, perplexity, decode, prefill, end to
# end, capacity, the quantization-error sampler's cost, prefix caching, transformers' peers.
set -uo pipefail
out=${OUT:?}; root=$PWD
mkdir -p /tmp/new /tmp/base
tar -C /tmp/new -xJf .device/lead/cuda-bundle.tar.xz; tar -C /tmp/base -xJf .device/main-bundle.tar.xz
new=/tmp/new/cuda-bundle base=/tmp/base/cuda-bundle
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "new: $(cat $new/COMMIT) base: $(cat $base/COMMIT)"; } | tee "$out/gpu.txt"
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model KVSERVE_TEST_BINARY=$new/kvserve
t() { echo "[$(date +%T)] $*"; }
s=$(date +%s)
timeout 200 "$new/run" kvserve_tests --gtest_filter='Gpu*:-GpuKvCache.DecodeStepsMatch*' --gtest_output="json:$out/gpu-tests.json" > "$out/gpu-tests.log" 2>&1
t "tests rc=$? in $(( $(date +%s) - s )) s"; grep -E "^\[  (PASSED|FAILED)|^\[  FAILED|Failure" "$out/gpu-tests.log" | head -30
for kv in fp16 kivi2; do
  timeout 40 "$new/run" kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz --windows 16 --device cuda --kv $kv 2>/dev/null | tee -a "$out/ppl.jsonl"
done
t ppl
bench() { local who=$1 dir; shift; dir=$([ $who = base ] && echo $base || echo $new)
  timeout 60 "$dir/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$1" --batches "$2" --context "$3" 2>/dev/null | sed "s/^{/{\"build\":\"$who\",/" >> "$out/bench.jsonl"; }
for kv in kivi2 fp16; do for who in base new; do bench $who $kv 1,64,256 512; bench $who $kv 256 944; done; done
t decode
python3 - "$out/bench.jsonl" <<'PY'
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print(r["build"],r["kv"],"B=%d ctx=%d"%(r["batch"],r["context"]),"%.3f ms"%r["ms_per_step"],"%.0f tok/s"%r["tokens_per_second"],"roof %.2f"%r.get("fraction_of_roofline",0))
PY
e2e() { local name=$1 who=$2 kv=$3; shift 3; local dir; dir=$([ $who = base ] && echo $base || echo $new)
  local line; line=$(timeout 100 "$dir/run" kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  echo "{\"case\":\"$name\",\"build\":\"$who\",\"result\":${line:-null}}" >> "$out/e2e.jsonl"
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['build'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'prompt %.0f'%x.get('prompt_throughput',0),'steps',x.get('steps'),'preempt',x.get('preemptions'))" "{\"case\":\"$name\",\"build\":\"$who\",\"result\":${line:-null}}"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512"
for who in new base; do for kv in fp16 kivi2; do e2e p512n128 $who $kv $P512 --max-new-tokens 128; done; done
for rate in 0 1; do e2e p512n128-error-rate-$rate new kivi2 $P512 --max-new-tokens 128 --kv-error-sample-rate $rate; done
t p512n128
for who in new base; do for kv in fp16 kivi2; do e2e p512n1 $who $kv $P512 --max-new-tokens 1; done; done
t prefill
CAP="--model dummy:gpt2 --kv-pool-mb 2048 --requests 512 --concurrency 512 --prompt-len 512 --max-new-tokens 512"
for who in new base; do for kv in fp16 kivi2; do e2e capacity-gpt2 $who $kv $CAP; done; done
t capacity
for kv in fp16 kivi2; do e2e capacity-gpt2-xl new $kv --model dummy:gpt2-xl --kv-pool-mb 40960 --requests 256 --concurrency 256 --prompt-len 512 --max-new-tokens 512; done
t xl
timeout 90 python3 "$new/hf_generate.py" --cases 256x512x128 2> "$out/hf-generate.log" | tee -a "$out/e2e.jsonl"
timeout 60 python3 "$new/hf_prefill.py" --cases 256x512 2> "$out/hf-prefill.log" | tee -a "$out/e2e.jsonl"
timeout 60 python3 "$new/hf_decode.py" --batches 1 --context 512 2> "$out/hf-decode.log" | tee -a "$out/bench.jsonl"
t hf
export LD_LIBRARY_PATH="$new/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export KVSERVE=$new/kvserve KVSERVE_CLI=$new/kvserve-cli KVSERVE_MODEL=$root/.device/model
MODEL=dummy:gpt2 EXTRA_FLAGS="--device cuda" POOL_MB=16384 PREFIX_LEN=512 UNIQUE_LEN=64 \
  NEW_TOKENS=128 CONCURRENCY=64 REQUESTS=128 KV_FORMATS="fp16 kivi2" timeout 150 bench/prefix.sh "$out/prefix.json" > "$out/prefix.md" 2> "$out/prefix.log"
t "prefix rc=$?"; cat "$out/prefix.md" | head -20
