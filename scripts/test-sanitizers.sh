#!/usr/bin/env bash
# The CPU test suite built with ASan and UBSan (gcc, build dir build-asan, -DKVSERVE_CUDA=OFF):
# every test, kvserve itself included (the server tests start the instrumented binary), the
# PyTorch-fixture comparisons (Reference.*, about 70 s here) too, except the deploy_* checks: they
# test YAML, the Dockerfile and metric names, not C++ memory safety.
# Any ASan or UBSan report fails the test that triggered it (UBSan aborts: -fno-sanitize-recover).
# The soak sends fewer requests (KVSERVE_SOAK_REQUESTS, default 100 here): the plain build soaks;
# here it is the concurrency that matters, and every request costs several times more.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${KVSERVE_ASAN_BUILD_DIR:-build-asan}
KVSERVE_BUILD_DIR=$build_dir KVSERVE_BUILD_TYPE=RelWithDebInfo scripts/build.sh \
  -DKVSERVE_CUDA=OFF -DKVSERVE_SANITIZE=address,undefined
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export KVSERVE_SOAK_REQUESTS=${KVSERVE_SOAK_REQUESTS:-100}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
ctest --test-dir "$build_dir" --output-on-failure -j"$(nproc)" -E '^deploy_'
