#!/usr/bin/env bash
set -uo pipefail
out=${OUT:?}; root=$PWD
mkdir -p /tmp/new /tmp/base
[ -d /tmp/new/cuda-bundle ] || tar -C /tmp/new -xJf .device/cuda-bundle.tar.xz
[ -d /tmp/base/cuda-bundle ] || tar -C /tmp/base -xJf .device/base-bundle.tar.xz
new=/tmp/new/cuda-bundle base=/tmp/base/cuda-bundle
nvidia-smi --query-gpu=name --format=csv | tee "$out/gpu.txt"
s=$(date +%s)
for who in base new; do dir=$([ $who = base ] && echo $base || echo $new)
  for kv in fp16 kivi2; do
    timeout 60 "$dir/run" kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz --windows 16 --device cuda --kv $kv 2>/dev/null | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'build':'$who','kv':r['kv'],'ppl':r['ppl'],'windows':r['windows']}))" | tee -a "$out/ppl.jsonl"
  done; done
echo "ppl in $(( $(date +%s) - s )) s"
s=$(date +%s)
for kv in fp16 kivi2; do
  line=$(timeout 150 "$new/run" kvserve bench engine --device cuda --kv $kv --model dummy:gpt2-xl --kv-pool-mb 40960 --requests 256 --concurrency 256 --prompt-len 512 --max-new-tokens 512 2>/dev/null)
  echo "{\"case\":\"capacity-gpt2-xl\",\"build\":\"new\",\"result\":${line:-null}}" | tee -a "$out/e2e.jsonl"
done
echo "xl in $(( $(date +%s) - s )) s"
s=$(date +%s)
timeout 240 python3 "$new/hf_generate.py" --cases 256x512x128 2> "$out/hf-generate.log" | tee -a "$out/e2e.jsonl"
echo "hf in $(( $(date +%s) - s )) s"; tail -3 "$out/hf-generate.log"
