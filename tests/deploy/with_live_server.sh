#!/usr/bin/env bash
# Runs a check against a live `kvserve serve` on loopback.
# Usage: with_live_server.sh KVSERVE KVSERVE_CLI MODEL_DIR -- COMMAND ARGS...
# Starts the server on free ports with MODEL_DIR, waits until it is SERVING, streams one request
# through kvserve-cli so every counter and histogram has samples, then runs COMMAND with
# @METRICS_URL@ in its arguments replaced by the server's /metrics address and @GRPC_ADDR@ by its
# gRPC HOST:PORT. Stops the server (SIGTERM, which must drain and exit 0) and exits with COMMAND's
# status.
set -euo pipefail
kvserve=$1 cli=$2 model=$3
shift 3
[ "$1" = "--" ] && shift
log=$(mktemp)
"$kvserve" serve --model "$model" --host 127.0.0.1 --port 0 --metrics-port 0 --kv-pool-mb 64 \
  >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 300); do
  grep -q 'SERVING: ' "$log" && break
  kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
grep -q 'SERVING: ' "$log" || { echo "kvserve did not become SERVING in 30 s"; cat "$log"; exit 1; }
grpc=$(sed -n 's/.*listening on \([0-9.:]*\) (gRPC).*/\1/p' "$log")
metrics=$(sed -n 's|.*metrics on \(http://[0-9.:]*/metrics\).*|\1|p' "$log")
"$cli" generate --addr "$grpc" --prompt "The kernel" --max-new-tokens 8 >/dev/null
args=()
for a in "$@"; do
  a=${a//@METRICS_URL@/$metrics}
  args+=("${a//@GRPC_ADDR@/$grpc}")
done
status=0
"${args[@]}" || status=$?
kill -TERM "$server"
wait "$server" || { echo "kvserve did not exit 0 after SIGTERM"; cat "$log"; exit 1; }
exit "$status"
