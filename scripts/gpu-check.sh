#!/usr/bin/env bash
# The GPU check: the GPU tests (tests/gpu_*_test.cc) and, with --ppl N, eval-ppl of every KV
# format on the GPU over N windows, logs and JSON written to one output folder.
#
# It has two halves, because the device tool sends the main checkout plus git-ignored paths named
# in `carry`, and the GPU machine has CUDA but none of Debian's libraries:
#   here:    scripts/gpu-check.sh pack [CHECKOUT]
#            builds kvserve_tests and kvserve in ./build, strips them and bundles them with their
#            libraries and this script into CHECKOUT/.device/cuda-bundle.tar.xz (about 7 MB: the
#            unpacked 45 MB, OpenBLAS mostly, would not fit the 64 MiB a call carries beside the
#            36 MB model). CHECKOUT: the checkout the device tool sends, default this one; the
#            test model must be in CHECKOUT/.device/model, the eval text in
#            CHECKOUT/.device/docs-val.txt.xz.
#   device:  run(carry=[".device"], timeout_s=300, command="tar -C .device -xJf
#                .device/cuda-bundle.tar.xz && .device/cuda-bundle/gpu-check.sh run --ppl 64")
#            runs in the checkout's root and writes into $OUT (or the folder given last):
#            gpu.txt, gpu-tests.log, gpu-tests.json, with --ppl ppl.jsonl, and with --bench
#            bench.jsonl: `kvserve bench decode` (dummy:gpt2, B = 1, 16, 64, 256, context 512, and
#            B = 256 at context 944 + 72 steps for the roofline) in fp16 and kivi2, then the
#            transformers baseline (bench/hf_decode.py, carried in the bundle) in the same call.
set -euo pipefail
mode=${1:-}
shift || true
case "$mode" in
  pack)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    checkout=$(cd "${1:-$repo}" && pwd)
    cd "$repo"
    if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
    cmake --build build --target kvserve_tests kvserve
    stripped=$(mktemp -d)
    cp build/bin/kvserve_tests build/bin/kvserve "$stripped/"
    strip "$stripped/kvserve_tests" "$stripped/kvserve"
    "$repo/../shared/tools/device-bundle.sh" "$stripped/cuda-bundle" \
      "$stripped/kvserve_tests" "$stripped/kvserve"
    strip --strip-unneeded "$stripped"/cuda-bundle/lib/*.so*
    cp "$0" "$stripped/cuda-bundle/gpu-check.sh"
    cp bench/hf_decode.py "$stripped/cuda-bundle/"
    rm -rf "$checkout/.device/cuda-bundle"
    tar -C "$stripped" -cf - cuda-bundle | xz -T0 -6 >"$checkout/.device/cuda-bundle.tar.xz"
    rm -rf "$stripped"
    du -sh "$checkout/.device"
    ;;
  run)
    bundle=$(cd "$(dirname "$0")" && pwd)
    [ -x "$bundle/run" ] || bundle=$PWD/.device/cuda-bundle
    ppl_windows=0 bench=0 tests=1
    while [ $# -gt 0 ]; do
      case "$1" in
        --ppl) ppl_windows=$2; shift 2 ;;
        --bench) bench=1; shift ;;
        --no-tests) tests=0; shift ;;
        *) break ;;
      esac
    done
    out=${1:-${OUT:?give an output folder}}
    mkdir -p "$out"
    export KVSERVE_TEST_SOURCE_DIR=$PWD KVSERVE_TEST_MODEL=$PWD/.device/model
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem \
      --format=csv >"$out/gpu.txt" 2>&1 || true
    status=0
    if [ "$tests" = 1 ]; then
      "$bundle/run" kvserve_tests --gtest_filter='Gpu*' --gtest_output="json:$out/gpu-tests.json" \
        2>&1 | tee "$out/gpu-tests.log" || status=1
    fi
    if [ "$ppl_windows" -gt 0 ]; then
      for kv in fp16 int8 kivi4 kivi2; do
        start=$(date +%s%N)
        "$bundle/run" kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz \
          --windows "$ppl_windows" --device cuda --kv "$kv" | tee -a "$out/ppl.jsonl" || status=1
        echo "eval-ppl $kv: $((($(date +%s%N) - start) / 1000000)) ms wall"
      done
    fi
    if [ "$bench" = 1 ]; then
      for kv in fp16 kivi2; do
        "$bundle/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$kv" \
          --batches 1,16,64,256 --context 512 | tee -a "$out/bench.jsonl" || status=1
      done
      # The roofline shape: B = 256 at a context of about 1024 (944 + 72 steps).
      for kv in fp16 kivi2; do
        "$bundle/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$kv" \
          --batches 256 --context 944 | tee -a "$out/bench.jsonl" || status=1
      done
      python3 "$bundle/hf_decode.py" --batches 1,16,64,256 --context 512 \
        2> "$out/hf-decode.log" | tee -a "$out/bench.jsonl" || status=1
    fi
    exit $status
    ;;
  *)
    sed -n 2,24p "$0"
    exit 2
    ;;
esac
