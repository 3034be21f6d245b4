#!/usr/bin/env bash
# Prefix caching (issue 20): `kvserve serve` on loopback with --prefix-cache on and off, for each
# KV format, driven by `kvserve-cli load --shared-prefix-len`: every prompt is one shared prefix of
# PREFIX_LEN random token ids and UNIQUE_LEN ids of its own, NEW_TOKENS greedy tokens each
# (end-of-text ignored), CONCURRENCY in flight. Records TTFT percentiles, throughput and the
# server's prefix cache statistics (GetCacheStats) after each run.
# Usage: bench/prefix.sh [OUT_FILE]   (default: prefix.json in a scratch folder, bench/paths.sh)
# Knobs (defaults: the issue's shape): PREFIX_LEN 512, UNIQUE_LEN 64, NEW_TOKENS 128,
# CONCURRENCY 64, REQUESTS 256, KV_FORMATS "fp16 kivi2", POOL_MB 512, MODEL and EXTRA_FLAGS as
# bench/serving.sh, e.g. on the GPU machine:
#   MODEL=dummy:gpt2 EXTRA_FLAGS="--device cuda" POOL_MB=16384 bench/prefix.sh /tmp/prefix.json
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."
source bench/paths.sh
out=$(output_path "${1:-}" prefix.json)
source bench/lib.sh
prefix_len=${PREFIX_LEN:-512}
unique_len=${UNIQUE_LEN:-64}
new_tokens=${NEW_TOKENS:-128}
prompt_len=$unique_len  # start_server's warm-up requests: unique prompts, no shared prefix
concurrency=${CONCURRENCY:-64}
requests=${REQUESTS:-256}
pool_mb=${POOL_MB:-512}
read -r -a formats <<<"${KV_FORMATS:-fp16 kivi2}"
read -r -a extra_flags <<<"${EXTRA_FLAGS:-}"

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
: >"$work/runs.jsonl"
for kv in "${formats[@]}"; do
  for cache in on off; do
    serve=("$kvserve" serve --model "$model" --kv "$kv" --kv-pool-mb "$pool_mb" "${extra_flags[@]}"
           --prefix-cache "$cache" --host 127.0.0.1 --port 0 --metrics-port 0
           --max-queued-requests 4096)
    start_server "${serve[@]}"
    echo "prefix: $kv, prefix cache $cache" >&2
    # --seed 1: the warm-up's prompts (seed 0) share no prefix with the timed ones.
    load_cmd=("$cli" load --addr "$addr" --requests "$requests" --concurrency "$concurrency"
              --shared-prefix-len "$prefix_len" --prompt-len "$unique_len"
              --max-new-tokens "$new_tokens" --temperature 0 --seed 1)
    "${load_cmd[@]}" --output "$work/load.json" >/dev/null
    "$cli" info --addr "$addr" >"$work/info.json"
    stop_server
    python3 - "$kv" "$cache" "${load_cmd[*]}" "${serve[*]}" "$work/load.json" "$work/info.json" \
      >>"$work/runs.jsonl" <<'PY'
import json, sys
kv, cache, command, server, load, info = sys.argv[1:]
stats = json.load(open(info))["cache"]
print(json.dumps({"kv": kv, "prefix_cache": cache, "command": command, "server": server,
                  "result": json.load(open(load)), "cache_stats": stats}))
PY
  done
done

mkdir -p "$(dirname "$out")"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
python3 - "$work/runs.jsonl" "$out" "$started" "$model" "$gpu" <<'PY'
import json, os, platform, sys
runs_file, target, started, model, gpu = sys.argv[1:]
runs = [json.loads(line) for line in open(runs_file)]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), platform.processor())
bench = {"benchmark": "prefix", "started": started, "model": model,
         "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}, "runs": runs}
with open(target, "w") as f:
    f.write(json.dumps(bench, indent=1) + "\n")
print("| kv | prefix cache | TTFT p50 (ms) | TTFT p99 (ms) | out tok/s | req/s | hit / queried tokens |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for run in runs:
    r, s = run["result"], run["cache_stats"]
    print(f"| {run['kv']} | {run['prefix_cache']} | {r['p50_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} "
          f"| {r['output_throughput']:.1f} | {r['request_throughput']:.2f} "
          f"| {int(s.get('prefix_cache_hits', 0))} / {int(s.get('prefix_cache_queries', 0))} |")
PY
