#!/usr/bin/env bash
# Generation speed in-process against through gRPC: for each KV format and each concurrency C,
# `kvserve bench engine` (the engine alone, C generations in flight) and then `kvserve serve` on
# loopback driven by `kvserve-cli load --concurrency C` with the same requests (random prompt ids
# of PROMPT_LEN, NEW_TOKENS tokens each at TEMPERATURE (default 0: greedy), end-of-text ignored).
# Both count output tokens over the wall time from the first request to the last token, prefill
# included.
# Usage: bench/serving.sh [OUT_FILE]   (default: serving.json in a scratch folder, bench/paths.sh)
# Knobs from the environment (bench/lib.sh has the shared ones), e.g. for the GPU machine:
#   MODEL=dummy:gpt2 EXTRA_FLAGS="--device cuda" POOL_MB=16384 bench/serving.sh /tmp/serving.json
# REQUESTS_PER_SLOT (default 2) sets requests = C * REQUESTS_PER_SLOT, at least MIN_REQUESTS (16).
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."
source bench/paths.sh
out=$(output_path "${1:-}" serving.json)
source bench/lib.sh
read -r -a extra_flags <<<"${EXTRA_FLAGS:-}"
pool_mb=${POOL_MB:-512}
temperature=${TEMPERATURE:-0}
per_slot=${REQUESTS_PER_SLOT:-2}
min_requests=${MIN_REQUESTS:-16}

# record KV CONCURRENCY PATH COMMAND SERVER_COMMAND < result.json: one line of runs.jsonl.
record() {
  python3 -c '
import json, sys
kv, concurrency, path, command, server = sys.argv[1:]
run = {"kv": kv, "concurrency": int(concurrency), "path": path, "command": command}
if server:
    run["server"] = server
run["result"] = json.load(sys.stdin)
print(json.dumps(run))' "$@" >>"$work/runs.jsonl"
}

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
: >"$work/runs.jsonl"
for kv in "${formats[@]}"; do
  common=(--model "$model" --kv "$kv" --kv-pool-mb "$pool_mb" "${extra_flags[@]}")
  for c in "${concurrencies[@]}"; do
    requests=$((c * per_slot > min_requests ? c * per_slot : min_requests))
    shape=(--requests "$requests" --concurrency "$c" --prompt-len "$prompt_len"
           --max-new-tokens "$new_tokens" --temperature "$temperature")
    echo "serving: $kv concurrency $c in-process" >&2
    engine_cmd=("$kvserve" bench engine "${common[@]}" "${shape[@]}")
    result=$("${engine_cmd[@]}" 2>"$work/engine.log" | tail -n 1) ||
      { cat "$work/engine.log" >&2; exit 1; }
    record "$kv" "$c" in-process "${engine_cmd[*]}" "" <<<"$result"
  done
  serve=("$kvserve" serve "${common[@]}" --host 127.0.0.1 --port 0 --metrics-port 0
         --max-queued-requests 4096)
  start_server "${serve[@]}"
  for c in "${concurrencies[@]}"; do
    requests=$((c * per_slot > min_requests ? c * per_slot : min_requests))
    echo "serving: $kv concurrency $c through gRPC" >&2
    load_cmd=("$cli" load --addr "$addr" --requests "$requests" --concurrency "$c"
              --prompt-len "$prompt_len" --max-new-tokens "$new_tokens"
              --temperature "$temperature")
    "${load_cmd[@]}" --output "$work/load.json" >/dev/null
    record "$kv" "$c" grpc "${load_cmd[*]}" "${serve[*]}" <"$work/load.json"
  done
  stop_server
done

mkdir -p "$(dirname "$out")"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
python3 - "$work/runs.jsonl" "$out" "$started" "$model" "$gpu" <<'PY'
import json, os, platform, sys
runs_file, target, started, model, gpu = sys.argv[1:]
runs = [json.loads(line) for line in open(runs_file)]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), platform.processor())
bench = {"benchmark": "serving", "started": started, "model": model,
         "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}, "runs": runs}
with open(target, "w") as f:
    f.write(json.dumps(bench, indent=1) + "\n")
print("| kv | concurrency | in-process out tok/s | gRPC out tok/s | gRPC / in-process |")
print("| --- | --- | --- | --- | --- |")
pairs = {}
for run in runs:
    pairs.setdefault((run["kv"], run["concurrency"]), {})[run["path"]] = run["result"]
for (kv, concurrency), pair in pairs.items():
    engine, grpc = pair["in-process"]["output_throughput"], pair["grpc"]["output_throughput"]
    print(f"| {kv} | {concurrency} | {engine:,.0f} | {grpc:,.0f} | {grpc / engine:.0%} |")
PY
