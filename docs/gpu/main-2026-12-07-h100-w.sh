#!/usr/bin/env bash
# Recorded as it ran (fifteenth session, call w, H100, the machine of call v): .device/s17/d.sh,
# command="WHO=win BUDGET=420 bash .device/s17/d.sh". Its eval-ppl found no text
# (.device/docs-val.txt.xz was not carried); call x ran it (docs/gpu.md, "Fifteenth session").
# Fifteenth session, call d (after c): win's (or rip's, WHO=rip) whole GPU suite, GPU eval-ppl of
# kivi2c and kivi2 at 64 windows, and the performance table: decode sweep and end to end of fp16,
# kivi2 and kivi2c in one call.
. .device/s17/common.sh
WHO=${WHO:-win}
tests $WHO 'Gpu*' 240
grep -E "^== |^\[  (PASSED|FAILED) |^\[  FAILED|Failure" $o/tests.log | cut -c1-170 | head -30
for kv in kivi2c kivi2; do
  timeout $(left 60) $(B $WHO)/run kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz \
    --windows 64 --device cuda --kv $kv | tee -a $o/ppl.jsonl | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('ppl',r['kv'],'%.6f'%r['ppl'])"
  t "ppl $kv"
done
for kv in fp16 kivi2 kivi2c; do dec $WHO $kv --batches 1,16,64,256 --context 512 --context-spread 32; done
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --prompt-len-spread 32 --max-new-tokens 128"
for kv in fp16 kivi2 kivi2c; do e2e p512n128s32 $WHO $kv $P512; done
t done
