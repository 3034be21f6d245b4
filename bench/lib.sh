# Sourced by the bench drivers that run `kvserve serve` on loopback (serving.sh, latency.sh), after
# `set -euo pipefail` and a cd to the repository root: the knobs they share, a work directory
# removed on exit, and starting and stopping the server.
# Knobs from the environment: KVSERVE, KVSERVE_CLI (the binaries), MODEL, FORMATS (KV formats),
# CONCURRENCIES, PROMPT_LEN (random prompt ids) and NEW_TOKENS (per request).
kvserve=${KVSERVE:-build/bin/kvserve}
cli=${KVSERVE_CLI:-build/bin/kvserve-cli}
model=${MODEL:-../shared/models/gpt2-tiny-docs}
read -r -a formats <<<"${FORMATS:-fp16 kivi2}"
read -r -a concurrencies <<<"${CONCURRENCIES:-1 4 16}"
prompt_len=${PROMPT_LEN:-64}
new_tokens=${NEW_TOKENS:-32}

work=$(mktemp -d)
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

# start_server SERVE_COMMAND...: runs it in the background (log in $work/server.log), waits up to
# 120 s for SERVING, sets `server` (its pid) and `addr` (its gRPC host:port), and sends a few
# unrecorded requests: the pool's and the weights' first-touch page faults, and the first steps'
# buffer growth, stay out of the figures.
start_server() {
  "$@" >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1200); do
    grep -q 'SERVING: ' "$work/server.log" && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q 'SERVING: ' "$work/server.log" || { echo "kvserve not SERVING in 120 s" >&2; exit 1; }
  addr=$(sed -n 's/.*listening on \([0-9.:]*\) (gRPC).*/\1/p' "$work/server.log")
  "$cli" load --addr "$addr" --requests 4 --concurrency 4 --prompt-len "$prompt_len" \
    --max-new-tokens "$new_tokens" >/dev/null
}

# stop_server: SIGTERM, and fails the run unless the server drains and exits 0.
stop_server() {
  [ -n "$server" ] || return 0
  kill -TERM "$server"
  if ! wait "$server"; then
    echo "kvserve did not exit 0 after SIGTERM" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
  server=""
}
