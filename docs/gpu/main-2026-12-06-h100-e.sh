#!/usr/bin/env bash
# Lead's combined GPU call (2026-12-06, third session): builds of the lead (split afab272, with
# base b97abb3), cuda16 (a5376a3) and decodek (6efacee) from one multi-bundle (shared libraries).
set -uo pipefail
out=${OUT:?}; root=$PWD
mkdir -p /tmp/m && tar -C /tmp/m -xJf .device/s3/multi.tar.xz
M=/tmp/m/multi
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; for b in new base cuda16 decodek; do echo "$b: $(cat $M/$b/COMMIT)"; done; } | tee "$out/gpu.txt"
export KVSERVE_TEST_SOURCE_DIR=$root KVSERVE_TEST_MODEL=$root/.device/model
summ() { grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|Expected|Which is|pools equal|steps agree|pipelines agree" "$1" | head -${2:-30}; }
# ---- lead: the mixed-step split (new) against base
mkdir -p $out/lead
KVSERVE_TEST_BINARY=$M/new/kvserve timeout 90 $M/new/run kvserve_tests --gtest_filter='GpuKvCache.PrefillSteps*:GpuKvCache.MatchesTheCpu*:GpuBackend.*:GpuPrefixCache.*' > $out/lead/gpu-tests.log 2>&1
t "lead tests rc=$?"; summ $out/lead/gpu-tests.log
e2e() { local name=$1 which=$2 kv=$3; shift 3
  local line; line=$(timeout 60 $M/$which/run kvserve bench engine --device cuda --kv $kv "$@" 2>/dev/null)
  local rec="{\"case\":\"$name\",\"binary\":\"$which\",\"flags\":\"$*\",\"result\":${line:-null}}"
  echo "$rec" >> $out/lead/e2e.jsonl
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); x=r['result'] or {}; print(r['case'],r['binary'],x.get('kv'),'out %.0f'%x.get('output_throughput',0),'steps',x.get('steps'),'captures',x.get('graph_captures'),json.dumps({k:(v['steps'],round(v['mean_ms'],3)) for k,v in (x.get('step_times') or {}).items()}))" "$rec"; }
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --max-new-tokens 128"
CAP="--model dummy:gpt2 --kv-pool-mb 2048 --requests 512 --concurrency 512 --prompt-len 512 --max-new-tokens 512"
for which in base new; do for kv in fp16 kivi2; do e2e p512n128 $which $kv $P512; done; done
e2e p512n128-noprefix new kivi2 $P512 --prefix-cache off
e2e capacity-gpt2 new fp16 $CAP; for which in base new; do e2e capacity-gpt2 $which kivi2 $CAP; done
t "lead e2e"
K='regex:decode_attention|kv_quantize|kv_compact|nvjet|layer_norm|bias_activation|sample|embedding|gemm|Kernel'
for spec in "gpt2 kivi2 256 944 3000"; do
  read -r m kv b c skip <<<"$spec"
  timeout 45 ncu --clock-control none -k "$K" --launch-skip $skip --launch-count 24 --metrics gpu__time_duration.sum --csv \
    $M/new/run kvserve bench decode --model dummy:$m --device cuda --kv $kv --batches $b --context $c --cuda-graphs off --steps 2 --warmup 8 \
    > $out/lead/ncu-layer-$m-$kv.csv 2> $out/lead/ncu-layer-$m-$kv.log
  t "ncu $m $kv rc=$?"; python3 - $out/lead/ncu-layer-$m-$kv.csv <<'PY'
import csv, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if rows:
    h = rows[0]; k = h.index("Kernel Name"); v = h.index("Metric Value")
    for r in rows[1:]: print("  %-70s %s" % (r[k][:70], r[v]))
PY
done
# ---- cuda16: fp8 params + int8 residual on CUDA
mkdir -p $out/cuda16; C=$M/cuda16
KVSERVE_TEST_BINARY=$C/kvserve timeout 120 $C/run kvserve_tests --gtest_filter='Gpu*:-GpuKvCache.DecodeStepsMatch*:GpuKvCache.*Throughput' --gtest_output="json:$out/cuda16/gpu-tests.json" > $out/cuda16/gpu-tests.log 2>&1
t "cuda16 tests rc=$?"; summ $out/cuda16/gpu-tests.log 60
for kv in fp16 kivi2 kivi2c; do timeout 40 $C/run kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz --windows 16 --device cuda --kv $kv | tee -a $out/cuda16/ppl.jsonl; done
t "cuda16 ppl"
for args in "--kv kivi2" "--kv kivi2c"; do timeout 30 $C/run kvserve bench decode --model dummy:gpt2 --device cuda $args --batches 256 --context 944 --steps 32 | tee -a $out/cuda16/bench.jsonl; done
for kv in kivi2 kivi2c; do line=$(timeout 40 $C/run kvserve bench engine --model dummy:gpt2 --device cuda --kv $kv $P512 2>/dev/null | tail -1); echo "{\"case\":\"p512n128\",\"result\":${line:-null}}" | tee -a $out/cuda16/e2e.jsonl | cut -c1-400; done
t "cuda16 bench"
# ---- decodek: packed kernel pipelines
mkdir -p $out/decodek; D=$M/decodek; B=$M/base
KVSERVE_TEST_BINARY=$D/kvserve timeout 60 $D/run kvserve_tests --gtest_filter=GpuKvCache.DecodeAttentionThroughput > $out/decodek/micro-new.log 2>&1
t "decodek micro rc=$?"; grep -E "B=256|split:|Failure|differs|FAILED|OK \]" $out/decodek/micro-new.log | head -40
for kv in kivi2 fp16; do for who in base decodek; do timeout 30 $M/$who/run kvserve bench decode --model dummy:gpt2 --device cuda --kv $kv --batches 256 --context 944 --steps 32 | sed "s/^{/{\"build\": \"$who\", /" | tee -a $out/decodek/bench.jsonl | cut -c1-300; done; done
KVSERVE_TEST_BINARY=$D/kvserve timeout 100 $D/run kvserve_tests --gtest_filter='GpuKvCache.PackedPipelines*:GpuKvCache.MatchesTheCpuCacheInEveryFormat:GpuBackend.GreedyTokens*:GpuBackend.DecodeGraphs*' > $out/decodek/gpu-tests.log 2>&1
t "decodek tests rc=$?"; summ $out/decodek/gpu-tests.log
