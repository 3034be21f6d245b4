#!/usr/bin/env bash
# CTest's driver of the OpenAI SDK test: installs the locked `openai` package (npm ci, only when
# node_modules is missing or older than the lock file) and runs openai_sdk.test.mjs against the
# kvserve binary given as $1.
# Usage: tests/http/run.sh BUILD/bin/kvserve
set -euo pipefail
export KVSERVE_BIN
KVSERVE_BIN=$(realpath "$1")
cd "$(dirname "$0")"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
exec node --test --test-reporter=spec openai_sdk.test.mjs
