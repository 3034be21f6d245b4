#!/usr/bin/env bash
# Throughput through the OpenAI HTTP API against gRPC: one `kvserve serve` on loopback, then
# `kvserve-cli load` closed loop at CONCURRENCY (default 64) through gRPC and through HTTP
# (`--api http`, POST /v1/completions streamed), alternating ROUNDS (default 3) times so that
# both APIs see the same drift of a shared machine.
# Usage: bench/http.sh [OUT_DIR]   (default docs/bench; writes OUT_DIR/http-vs-grpc.json)
# The JSON holds the machine, the date, the server command and, for every run, its API, round,
# exact kvserve-cli command and full result. Knobs: those of bench/lib.sh (FORMATS' first entry
# is the KV format) plus CONCURRENCY, REQUESTS (default 2 x CONCURRENCY) and ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench}
source bench/lib.sh
concurrency=${CONCURRENCY:-64}
requests=${REQUESTS:-$((2 * concurrency))}
rounds=${ROUNDS:-3}
kv=${formats[0]}

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
serve=("$kvserve" serve --model "$model" --kv "$kv" --host 127.0.0.1 --port 0 --metrics-port 0)
start_server "${serve[@]}"
http_addr=$(sed -n 's|.*metrics on http://\([0-9.:]*\)/metrics.*|\1|p' "$work/server.log")
: >"$work/manifest.tsv"
for round in $(seq "$rounds"); do
  for api in grpc http; do
    target=$addr
    [ "$api" = grpc ] || target=$http_addr
    file="$work/$api-$round.json"
    cmd=("$cli" load --api "$api" --addr "$target" --requests "$requests" --rate inf
         --concurrency "$concurrency" --prompt-len "$prompt_len" --max-new-tokens "$new_tokens"
         --output "$file")
    echo "http bench: round $round, $api" >&2
    "${cmd[@]}" >/dev/null
    printf '%s\t%s\t%s\t%s\n' "$api" "$round" "$file" "${cmd[*]:0:${#cmd[@]}-2}" \
      >>"$work/manifest.tsv"
  done
done
stop_server

mkdir -p "$out"
"${PYTHON:-/usr/bin/python3}" - "$work" "$out/http-vs-grpc.json" "$started" "${serve[*]}" <<'PY'
import json, os, pathlib, platform, statistics, subprocess, sys
work, target, started, serve = sys.argv[1:]
work = pathlib.Path(work)
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
runs = []
for line in (work / "manifest.tsv").read_text().splitlines():
    api, round_, file, command = line.split("\t")
    runs.append({"api": api, "round": int(round_), "command": command,
                 "result": json.loads(pathlib.Path(file).read_text())})
median = {api: statistics.median(r["result"]["output_throughput"] for r in runs if r["api"] == api)
          for api in ("grpc", "http")}
report = {
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_end": os.getloadavg()},
    "started": started, "commit": commit, "server": serve,
    "median_output_throughput": median,
    "http_over_grpc": median["http"] / median["grpc"],
    "runs": runs,
}
pathlib.Path(target).write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: report[k] for k in ("median_output_throughput", "http_over_grpc")}))
PY
