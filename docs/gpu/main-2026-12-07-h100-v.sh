#!/usr/bin/env bash
# Recorded as it ran (fifteenth session, call v, H100): .device/s17/c.sh, sourcing
# .device/s17/common.sh (main-2026-12-07-h100-v-common.sh); run(carry=[".device/model",
# ".device/s17"],
# command="BUDGET=580 bash .device/s17/c.sh"). Bundles under .device/s17/{main,rip,win}.
# Fourteenth session, call c (one call of a and b's essentials): rip's GPU tests (all Gpu*), win's
# decode-attention tests; decode spread 32 main/rip/win, kivi2c and kivi2; ncu per kernel at
# B = 256 (kivi2c main/rip/win, kivi2 rip); end to end P512 N128 spread 32; decode pass 2.
. .device/s17/common.sh
tests rip 'Gpu*' 230
tests win 'GpuKvCache.DecodeSteps*:GpuKvCache.PackedDecode*:GpuBackend.LogitsAreClose*:GpuBackend.GreedyTokens*:GpuBackend.DecodeGraphs*:GpuKvCache.MatchesTheCpuCacheInEveryFormat' 120
grep -E "^== |^\[  (PASSED|FAILED) |^\[  FAILED|Failure|first pool byte" $o/tests.log | cut -c1-170 | head -40
decode; t "decode pass 1"
for w in main rip win; do ncu_layer $w kivi2c; done
ncu_layer rip kivi2
P512="--model dummy:gpt2 --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 --prompt-len-spread 32 --max-new-tokens 128"
for kv in kivi2c kivi2; do for w in main rip win; do e2e p512n128s32 $w $kv $P512; done; done
t e2e
decode; t "decode pass 2"
t done
