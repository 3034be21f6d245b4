#!/usr/bin/env bash
# Configures and builds kvserve (CUDA code included when nvcc is found). Extra arguments go to
# cmake's configure step, e.g. scripts/build.sh -DKVSERVE_CUDA=OFF.
# KVSERVE_BUILD_DIR (default build) and KVSERVE_BUILD_TYPE (default Release) select the build;
# KVSERVE_BUILD_TARGETS (space-separated, default all) the targets, e.g. "kvserve kvserve-cli" for
# the Dockerfile, whose image ships only those two binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
build_dir=${KVSERVE_BUILD_DIR:-build}
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE="${KVSERVE_BUILD_TYPE:-Release}" \
  "${launcher[@]}" "$@" >/dev/null
targets=()
for target in ${KVSERVE_BUILD_TARGETS:-}; do targets+=(--target "$target"); done
cmake --build "$build_dir" -j"$(nproc)" "${targets[@]}"
