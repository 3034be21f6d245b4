#!/usr/bin/env bash
# The README's test command: installs dependencies, builds, and runs every test that this machine
# can run (GPU tests skip themselves without a GPU; scripts/gpu-check.sh runs them on one), then
# the CPU suite under ASan + UBSan and a short run of every fuzz target (KVSERVE_FUZZ_SECONDS each,
# default 30).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir "${KVSERVE_BUILD_DIR:-build}" --output-on-failure -j"$(nproc)"
scripts/test-sanitizers.sh
scripts/fuzz.sh
