#!/usr/bin/env bash
# Latency under load through gRPC: for each KV format, starts `kvserve serve` on loopback and runs
# `kvserve-cli load` at several Poisson request rates (concurrency capped) and, closed loop, at
# several concurrencies.
# Usage: bench/latency.sh [OUT_DIR]   (writes OUT_DIR/latency.json; default: a scratch folder,
# bench/paths.sh; docs/bench holds the committed run)
# The JSON holds the machine, the date, the server command and, for every run, its sweep, rate (a
# number, or "inf" in the closed-loop sweep), concurrency, exact kvserve-cli command and full
# result. The defaults keep a run to about five minutes on two CPU cores with the tiny test model;
# every knob below and in bench/lib.sh can be overridden from the environment, e.g.
# MODEL=dummy:gpt2 EXTRA_SERVE_FLAGS="--device cuda" RATES="8 16 32 64" bench/latency.sh /tmp/out
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."
source bench/paths.sh
out=$(output_path "${1:-}" latency)
source bench/lib.sh
read -r -a rates <<<"${RATES:-0.5 1 2 4}"
read -r -a extra_serve_flags <<<"${EXTRA_SERVE_FLAGS:-}"
rate_concurrency=${RATE_CONCURRENCY:-16}
requests=${REQUESTS:-16}
# TEMPERATURE unset: the server's default sampling (1.0); 0 asks for greedy.
temperature_flag=()
[ -z "${TEMPERATURE:-}" ] || temperature_flag=(--temperature "$TEMPERATURE")

# Runs and records one load: its result file and a manifest line (kv, sweep, rate, concurrency,
# file, and the command without its temporary --output).
load() {
  local kv=$1 sweep=$2 rate=$3 concurrency=$4
  local file="$work/$kv-$sweep-$rate-$concurrency.json"
  local cmd=("$cli" load --addr "$addr" --requests "$requests" --rate "$rate"
             --concurrency "$concurrency" --prompt-len "$prompt_len" --max-new-tokens "$new_tokens"
             "${temperature_flag[@]}" --output "$file")
  echo "latency: $kv $sweep rate=$rate concurrency=$concurrency" >&2
  "${cmd[@]}" >/dev/null
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kv" "$sweep" "$rate" "$concurrency" "$file" \
    "${cmd[*]:0:${#cmd[@]}-2}" >>"$work/manifest.tsv"
}

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
: >"$work/manifest.tsv"
for kv in "${formats[@]}"; do
  serve=("$kvserve" serve --model "$model" --kv "$kv" --host 127.0.0.1 --port 0 --metrics-port 0
         "${extra_serve_flags[@]}")
  start_server "${serve[@]}"
  echo "${serve[*]}" >"$work/serve-$kv.txt"
  for rate in "${rates[@]}"; do load "$kv" rate "$rate" "$rate_concurrency"; done
  for c in "${concurrencies[@]}"; do load "$kv" concurrency inf "$c"; done
  stop_server
done

mkdir -p "$out"
"${PYTHON:-/usr/bin/python3}" - "$work" "$out/latency.json" "$started" "$model" "$rate_concurrency" <<'PY'
import json, os, pathlib, platform, subprocess, sys
work, target, started, model, rate_concurrency = sys.argv[1:]
work = pathlib.Path(work)
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), platform.processor())
os_name = next(line.split("=", 1)[1].strip().strip('"') for line in open("/etc/os-release")
               if line.startswith("PRETTY_NAME="))
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
except FileNotFoundError:  # the GPU machine's checkout copy may have no git
    commit = os.environ.get("KVSERVE_COMMIT", "")
runs = []
for line in (work / "manifest.tsv").read_text().splitlines():
    kv, sweep, rate, concurrency, file, command = line.split("\t")
    runs.append({"kv": kv, "sweep": sweep, "rate": rate if rate == "inf" else float(rate),
                 "concurrency": int(concurrency), "command": command,
                 "result": json.loads(pathlib.Path(file).read_text())})
servers = {p.stem.removeprefix("serve-"): p.read_text().strip() for p in work.glob("serve-*.txt")}
bench = {
    "benchmark": "latency", "started": started, "model": model, "commit": commit,
    # Server and load generator share the cores, and other work on the machine shows in the load
    # average: read the figures with it.
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "os": os_name,
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    "rate_sweep_concurrency": int(rate_concurrency), "servers": servers, "runs": runs,
}
pathlib.Path(target).write_text(json.dumps(bench, indent=1) + "\n")
print("| kv | rate | concurrency | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
      "| TPOT p50 | E2E p50 |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for run in runs:
    r = run["result"]
    print(f"| {run['kv']} | {run['rate']} | {run['concurrency']} | {r['request_throughput']:.2f} "
          f"| {r['output_throughput']:.1f} | {r['p50_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} "
          f"| {r['p50_itl_ms']:.1f} | {r['p99_itl_ms']:.1f} | {r['p50_tpot_ms']:.1f} "
          f"| {r['p50_e2el_ms']:.0f} |")
PY
