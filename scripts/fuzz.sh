#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang, ASan and UBSan (build dir build-fuzz) and runs
# each for KVSERVE_FUZZ_SECONDS (default 30) from its seed corpus in fuzz/corpus. New inputs go to a
# scratch copy, not the committed corpus; a crash leaves its input in build-fuzz/findings and fails.
# Usage: scripts/fuzz.sh [TARGET...]   (default: all; e.g. scripts/fuzz.sh tokenizer)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${KVSERVE_FUZZ_BUILD_DIR:-build-fuzz}
seconds=${KVSERVE_FUZZ_SECONDS:-30}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(tokenizer safetensors model_config request)
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
CC=clang CXX=clang++ cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVSERVE_CUDA=OFF -DKVSERVE_FUZZ=ON -DKVSERVE_SANITIZE=address,undefined "${launcher[@]}" \
  >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target "${targets[@]/%/_fuzzer}"
findings="$build_dir/findings"
mkdir -p "$findings"
for target in "${targets[@]}"; do
  corpus="$build_dir/corpus/$target"
  mkdir -p "$corpus"
  echo "fuzz: $target for ${seconds}s"
  log="$build_dir/$target.log"
  if ! "$build_dir/bin/${target}_fuzzer" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$findings/$target-" "$corpus" "fuzz/corpus/$target" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $target failed; the input is in $findings" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)|DONE' "$log"
done
