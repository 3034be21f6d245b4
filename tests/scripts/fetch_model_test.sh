#!/usr/bin/env bash
# scripts/fetch-model.sh against a local HTTP server (python3 -m http.server on 127.0.0.1) that
# serves the test model in the Hugging Face hub's URL layout: a fresh download, a file already
# complete, a partial file (python's server takes no byte ranges, so the script fetches it again),
# a bad name, and a server without the files.
# Usage: fetch_model_test.sh SCRIPT MODEL_DIR
set -euo pipefail
script=$1 model=$2
work=$(mktemp -d)
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

hub=$work/hub/openai-community/gpt2/resolve/main
mkdir -p "$hub"
for f in config.json vocab.json merges.txt model.safetensors; do cp "$model/$f" "$hub/$f"; done
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$work/hub" >"$work/server.log" 2>&1 &
server=$!
port=""
for _ in $(seq 100); do
  port=$(sed -n 's/.*port \([0-9]*\).*/\1/p' "$work/server.log" | head -1)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "http.server did not start" >&2; cat "$work/server.log" >&2; exit 1; }
export HF_ENDPOINT=http://127.0.0.1:$port HF_TOKEN=test-token

fail() { echo "FAIL: $*" >&2; exit 1; }
same_files() {
  for f in config.json vocab.json merges.txt model.safetensors; do
    cmp -s "$model/$f" "$1/$f" || fail "$1/$f differs from the served file"
  done
}

"$script" gpt2 "$work/out" || fail "fresh download"
same_files "$work/out"

"$script" gpt2 "$work/out" 2>"$work/again.log" || fail "second run"
grep -q "model.safetensors is complete" "$work/again.log" || fail "a complete file was fetched again"

head -c 1000000 "$model/model.safetensors" >"$work/out/model.safetensors"
"$script" gpt2 "$work/out" || fail "partial file"
same_files "$work/out"

status=0
"$script" gpt3 "$work/bad" 2>/dev/null || status=$?
[ "$status" = 2 ] || fail "unknown model: exit status $status, expected 2"

status=0
"$script" gpt2-xl "$work/missing" 2>/dev/null || status=$?
[ "$status" = 1 ] || fail "files the server does not have: exit status $status, expected 1"
echo "fetch-model: all checks passed"
