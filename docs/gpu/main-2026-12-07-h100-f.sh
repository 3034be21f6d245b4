#!/usr/bin/env bash
# Eighth session, call b (same warm machine as a): bundle lanes (87326fb) through the GPU check:
# eval-ppl of every format, kivi2c included, over 64 windows, and the decode sweep (fp16, kivi2,
# kivi2c at B = 1, 16, 64, 256, context 512; B = 256 at context 944) with the transformers
# baseline of the same call.
set -uo pipefail
mkdir -p /tmp/new && tar -C /tmp/new -xJf .device/s9/lanes/cuda-bundle.tar.xz
timeout 380 /tmp/new/cuda-bundle/gpu-check.sh run --no-tests --ppl 64 --bench "$OUT/b"
echo "gpu-check rc=$?"
grep -h '"ppl"' "$OUT/b/ppl.jsonl" | python3 -c "
import json,sys
for l in sys.stdin: r=json.loads(l); print(r['kv'], r['ppl'], r['seconds'])"
python3 -c "
import json
for l in open('$OUT/b/bench.jsonl'):
    r=json.loads(l); print(r.get('impl', 'kvserve'), r.get('kv'), r['batch'], r['context'], r.get('cuda_graphs'), round(r['tokens_per_second']), r.get('ms_per_step'))"
