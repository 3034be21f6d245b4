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
#            gpu.txt, gpu-tests.log, gpu-tests.json, and with
#              --ppl N    ppl.jsonl: eval-ppl of every format (fp16, int8, kivi4, kivi2 and the
#                         kivi2c preset) on the GPU over N windows;
#              --bench    bench.jsonl: `kvserve bench decode` (dummy:gpt2, B = 1, 16, 64, 256,
#                         context 512, and B = 256 at context 944 + 72 steps for the roofline) in
#                         fp16, kivi2 and kivi2c, the same sweep with contexts spread over 32
#                         tokens (--context-spread 32: KIVI sequences flush at different steps,
#                         as mixed lengths do), then the transformers baseline
#                         (bench/hf_decode.py) in the same call;
#              --models   models.jsonl: dummy:gpt2-medium/-large/-xl at B = 64, context 512, fp16
#                         and kivi2, each with its transformers baseline;
#              --serving  serving.json and latency.json: bench/serving.sh (in-process against
#                         gRPC, concurrency 1..256) and bench/latency.sh on the GPU;
#              --prefill  prefill.jsonl: prefill alone, `kvserve bench engine` P512 N1 (512 requests,
#                         concurrency 256, budget 16,384) in fp16, int8, kivi4 and kivi2 with each
#                         --prefill-attention kernel (tensor, tiled), then transformers' one batched
#                         forward of 256 x 512 (bench/hf_prefill.py); with --baseline DIR the
#                         kvserve runs repeat with DIR's binaries (default kernel, fp16 and kivi2);
#              --e2e      e2e.jsonl: the end-to-end table of docs/gpu.md with default flags:
#                         `kvserve bench engine` P512 N128 (512 requests, concurrency 256; again
#                         with --prompt-len-spread 32, prompts of 512 to 543 tokens), the
#                         capacity-bound runs (gpt2 in a 2 GiB pool, P512 N512, 512 requests at
#                         concurrency 512; gpt2-xl in 40 GiB, 256 requests), fp16, kivi2 and
#                         kivi2c, then
#                         transformers' batch generate of the same shape (bench/hf_generate.py);
#                         with --baseline DIR (another unpacked bundle) the kvserve runs repeat
#                         with DIR's binaries in the same call, marked "binary": "baseline";
#              --prefix   prefix.json: bench/prefix.sh (issue 20) on dummy:gpt2, one 512-token
#                         shared prefix + 64 unique tokens + 128 new, concurrency 64, 256
#                         requests, --prefix-cache on and off, fp16 and kivi2, 16 GiB pool;
#              --tests F  runs only the GPU tests matching the gtest filter F (default Gpu*);
#              --no-tests skips the GPU tests.
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
    cmake --build build --target kvserve-cli
    cp build/bin/kvserve_tests build/bin/kvserve build/bin/kvserve-cli "$stripped/"
    strip "$stripped/kvserve_tests" "$stripped/kvserve" "$stripped/kvserve-cli"
    "$repo/../shared/tools/device-bundle.sh" "$stripped/cuda-bundle" \
      "$stripped/kvserve_tests" "$stripped/kvserve" "$stripped/kvserve-cli"
    strip --strip-unneeded "$stripped"/cuda-bundle/lib/*.so*
    cp "$0" "$stripped/cuda-bundle/gpu-check.sh"
    cp bench/hf_decode.py bench/hf_generate.py bench/hf_prefill.py "$stripped/cuda-bundle/"
    git -C "$repo" describe --always --dirty >"$stripped/cuda-bundle/COMMIT"
    rm -rf "$checkout/.device/cuda-bundle"
    # Written under a name of its own, then renamed: two packs at once (two worktrees packing for
    # the same checkout) each leave a whole bundle, never one interleaved file.
    tar -C "$stripped" -cf - cuda-bundle | xz -T0 -6 >"$checkout/.device/cuda-bundle.tar.xz.$$"
    mv -f "$checkout/.device/cuda-bundle.tar.xz.$$" "$checkout/.device/cuda-bundle.tar.xz"
    rm -rf "$stripped"
    du -sh "$checkout/.device"
    ;;
  run)
    bundle=$(cd "$(dirname "$0")" && pwd)
    [ -x "$bundle/run" ] || bundle=$PWD/.device/cuda-bundle
    ppl_windows=0 bench=0 models=0 serving=0 prefill=0 e2e=0 prefix=0 baseline='' tests=1 filter='Gpu*'
    while [ $# -gt 0 ]; do
      case "$1" in
        --ppl) ppl_windows=$2; shift 2 ;;
        --bench) bench=1; shift ;;
        --models) models=1; shift ;;
        --serving) serving=1; shift ;;
        --prefill) prefill=1; shift ;;
        --e2e) e2e=1; shift ;;
        --prefix) prefix=1; shift ;;
        --baseline) baseline=$(cd "$2" && pwd); shift 2 ;;
        --tests) filter=$2; shift 2 ;;
        --no-tests) tests=0; shift ;;
        *) break ;;
      esac
    done
    out=${1:-${OUT:?give an output folder}}
    mkdir -p "$out"
    # The tests start the bundle's kvserve (the compiled-in path is the build machine's).
    export KVSERVE_TEST_SOURCE_DIR=$PWD KVSERVE_TEST_MODEL=$PWD/.device/model \
      KVSERVE_TEST_BINARY=$bundle/kvserve
    cp "$bundle/COMMIT" "$out/commit.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem \
      --format=csv >"$out/gpu.txt" 2>&1 || true
    status=0
    if [ "$tests" = 1 ]; then
      "$bundle/run" kvserve_tests --gtest_filter="$filter" --gtest_output="json:$out/gpu-tests.json" \
        2>&1 | tee "$out/gpu-tests.log" || status=1
    fi
    if [ "$ppl_windows" -gt 0 ]; then
      for kv in fp16 int8 kivi4 kivi2 kivi2c; do
        start=$(date +%s%N)
        "$bundle/run" kvserve eval-ppl --model .device/model --text .device/docs-val.txt.xz \
          --windows "$ppl_windows" --device cuda --kv "$kv" | tee -a "$out/ppl.jsonl" || status=1
        echo "eval-ppl $kv: $((($(date +%s%N) - start) / 1000000)) ms wall"
      done
    fi
    if [ "$bench" = 1 ]; then
      for kv in fp16 kivi2 kivi2c; do
        "$bundle/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$kv" \
          --batches 1,16,64,256 --context 512 | tee -a "$out/bench.jsonl" || status=1
      done
      # Equal contexts flush a KIVI batch all at once, one step in G; spread ones every step.
      for kv in fp16 kivi2 kivi2c; do
        "$bundle/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$kv" \
          --batches 1,16,64,256 --context 512 --context-spread 32 | tee -a "$out/bench.jsonl" ||
          status=1
      done
      # The roofline shape: B = 256 at a context of about 1024 (944 + 72 steps).
      for kv in fp16 kivi2 kivi2c; do
        "$bundle/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv "$kv" \
          --batches 256 --context 944 | tee -a "$out/bench.jsonl" || status=1
      done
      # What the graphs buy: the same shapes with every step launched kernel by kernel.
      "$bundle/run" kvserve bench decode --model dummy:gpt2 --device cuda --kv fp16 \
        --batches 1,256 --context 512 --cuda-graphs off | tee -a "$out/bench.jsonl" || status=1
      python3 "$bundle/hf_decode.py" --batches 1,16,64,256 --context 512 \
        2> "$out/hf-decode.log" | tee -a "$out/bench.jsonl" || status=1
    fi
    if [ "$models" = 1 ]; then
      for geometry in gpt2-medium gpt2-large gpt2-xl; do
        for kv in fp16 kivi2; do
          "$bundle/run" kvserve bench decode --model "dummy:$geometry" --device cuda --kv "$kv" \
            --batches 64 --context 512 | tee -a "$out/models.jsonl" || status=1
        done
        python3 "$bundle/hf_decode.py" --geometry "$geometry" --batches 64 --context 512 \
          2>> "$out/hf-decode.log" | tee -a "$out/models.jsonl" || status=1
      done
    fi
    if [ "$prefill" = 1 ]; then
      prefill_run() {  # which dir kv [flags...]
        local which=$1 dir=$2 kv=$3 line
        shift 3
        line=$("$dir/run" kvserve bench engine --model dummy:gpt2 --device cuda --kv "$kv" \
          --kv-pool-mb 16384 --requests 512 --concurrency 256 --prompt-len 512 \
          --max-new-tokens 1 --max-batch-tokens 16384 "$@") || status=1
        echo "{\"case\":\"p512n1\",\"binary\":\"$which\",\"result\":${line:-null}}" |
          tee -a "$out/prefill.jsonl"
      }
      for kv in fp16 int8 kivi4 kivi2; do
        for kernel in tensor tiled; do prefill_run new "$bundle" "$kv" --prefill-attention "$kernel"; done
      done
      if [ -n "$baseline" ]; then
        for kv in fp16 kivi2; do prefill_run baseline "$baseline" "$kv"; done
      fi
      python3 "$bundle/hf_prefill.py" --cases 256x512 2> "$out/hf-prefill.log" |
        tee -a "$out/prefill.jsonl" || status=1
    fi
    if [ "$e2e" = 1 ]; then
      # name model pool-mb requests concurrency prompt new prompt-spread
      cases=("p512n128 dummy:gpt2 16384 512 256 512 128 1"
             "p512n128-spread32 dummy:gpt2 16384 512 256 512 128 32"
             "capacity-gpt2 dummy:gpt2 2048 512 512 512 512 1"
             "capacity-gpt2-xl dummy:gpt2-xl 40960 256 256 512 512 1")
      binaries=("new $bundle")
      [ -n "$baseline" ] && binaries+=("baseline $baseline")
      for c in "${cases[@]}"; do
        read -r name model pool requests concurrency prompt new spread <<<"$c"
        # Only where it spreads: a baseline bundle older than the flag refuses it.
        spread_flag=()
        [ "$spread" != 1 ] && spread_flag=(--prompt-len-spread "$spread")
        for b in "${binaries[@]}"; do
          read -r which dir <<<"$b"
          for kv in fp16 kivi2 kivi2c; do
            line=$("$dir/run" kvserve bench engine --model "$model" --device cuda --kv "$kv" \
              --kv-pool-mb "$pool" --requests "$requests" --concurrency "$concurrency" \
              --prompt-len "$prompt" --max-new-tokens "$new" "${spread_flag[@]}") || status=1
            echo "{\"case\":\"$name\",\"binary\":\"$which\",\"result\":${line:-null}}" |
              tee -a "$out/e2e.jsonl"
          done
        done
      done
      python3 "$bundle/hf_generate.py" --cases 256x512x128 2> "$out/hf-generate.log" |
        tee -a "$out/e2e.jsonl" || status=1
    fi
    if [ "$serving" = 1 ]; then
      # The bench scripts run the bundle's binaries; dummy models borrow the test model's tokenizer.
      export LD_LIBRARY_PATH="$bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
      export KVSERVE=$bundle/kvserve KVSERVE_CLI=$bundle/kvserve-cli KVSERVE_MODEL=$PWD/.device/model
      export PYTHON=python3 KVSERVE_COMMIT=$(cat "$bundle/COMMIT")
      MODEL=dummy:gpt2 EXTRA_FLAGS="--device cuda" POOL_MB=16384 CONCURRENCIES="1 16 64 256" \
        PROMPT_LEN=512 NEW_TOKENS=128 TEMPERATURE=0 bench/serving.sh "$out/serving.json" || status=1
      MODEL=dummy:gpt2 EXTRA_SERVE_FLAGS="--device cuda --kv-pool-mb 16384" \
        RATES="32 128 512" RATE_CONCURRENCY=256 CONCURRENCIES="16 256" REQUESTS=256 \
        PROMPT_LEN=512 NEW_TOKENS=128 TEMPERATURE=0 bench/latency.sh "$out" || status=1
    fi
    if [ "$prefix" = 1 ]; then
      export LD_LIBRARY_PATH="$bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
      export KVSERVE=$bundle/kvserve KVSERVE_CLI=$bundle/kvserve-cli KVSERVE_MODEL=$PWD/.device/model
      MODEL=dummy:gpt2 EXTRA_FLAGS="--device cuda" POOL_MB=16384 PREFIX_LEN=512 UNIQUE_LEN=64 \
        NEW_TOKENS=128 CONCURRENCY=64 REQUESTS=256 bench/prefix.sh "$out/prefix.json" |
        tee "$out/prefix.md" || status=1
    fi
    exit $status
    ;;
  *)
    sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d'
    exit 2
    ;;
esac
