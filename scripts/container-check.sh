#!/usr/bin/env bash
# Builds the CPU image from the repository's Dockerfile with podman and runs it the way users run
# the image, offline: nothing comes from outside but Debian's packages (the base image is made
# with debootstrap from the Debian mirror apt already uses). CI runs this after scripts/test.sh.
#   1. Debian 12 base: debootstrap --variant=minbase, cached as a tarball in
#      $KVSERVE_CONTAINER_CACHE (default ~/.cache/kvserve-container), imported as
#      localhost/debian:bookworm.
#   2. podman build of the Dockerfile with both bases set to it and KVSERVE_CUDA=OFF; reports the
#      image size; the runtime image must hold no compiler and no -dev package.
#   3. deploy/docker-compose.yml through Debian's docker-compose `config` (schema validation and
#      interpolation), checking the model volume it resolves.
#   4. podman run as the image's user (uid 10001) with the compose kvserve service's command
#      line, the test model mounted read-only at /models/gpt2 and the ports published on
#      loopback: time to SERVING, `kvserve-cli health` and `generate` from the host, /metrics,
#      the image's own HEALTHCHECK, then `podman stop` (SIGTERM to kvserve, PID 1) with a request
#      in flight: it must finish, and the container must exit 0 within the service's
#      stop_grace_period.
# Every container, image, mount and file it makes lives under one temporary folder (podman's
# --root/--runroot/--tmpdir/--network-config-dir point there) and is removed on exit, as are the
# few folders podman makes elsewhere regardless (see stray_paths) when they were not there before. Containers use
# slirp4netns networking and the build host networking, so no CNI bridge, iptables rule or
# /var/lib/cni state is made; the script checks that no podman/CNI iptables chain appeared.
# Fails (never skips) when podman cannot build or run here, with the reason.
# Needs root (rootful podman); installs its tools with scripts/install-deps.sh container.
# Usage: scripts/container-check.sh
#   KVSERVE_CLI      host kvserve-cli (default ${KVSERVE_BUILD_DIR:-build}/bin/kvserve-cli)
#   KVSERVE_TEST_MODEL  model directory (default ../shared/models/gpt2-tiny-docs)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

log() { echo "container-check: $*"; }
fail() {
  echo "container-check: FAILED: $*" >&2
  exit 1
}
[ "$(id -u)" -eq 0 ] || fail "needs root: rootful podman (run with sudo)"

cli=$(realpath -m "${KVSERVE_CLI:-${KVSERVE_BUILD_DIR:-build}/bin/kvserve-cli}")
model=$(realpath -m "${KVSERVE_TEST_MODEL:-../shared/models/gpt2-tiny-docs}")
cache=${KVSERVE_CONTAINER_CACHE:-$HOME/.cache/kvserve-container}
image=localhost/kvserve-check:cpu
base=localhost/debian:bookworm
# The HEALTHCHECK's start period: model load and warm-up must end within it.
serving_timeout_s=300
[ -x "$cli" ] || fail "no host kvserve-cli at $cli (build it first: scripts/build.sh)"
[ -f "$model/config.json" ] || fail "no test model at $model"

scripts/install-deps.sh container
for tool in podman debootstrap runc slirp4netns docker-compose curl; do
  command -v "$tool" >/dev/null || fail "$tool not found after scripts/install-deps.sh container"
done

work=$(mktemp -d "${TMPDIR:-/var/tmp}/kvserve-container.XXXXXX")
name=kvserve-check-$$
mkdir -p "$work/tmp"
export TMPDIR=$work/tmp
podman_global=(--root "$work/storage" --runroot "$work/run" --tmpdir "$work/libpod"
  --network-config-dir "$work/net" --runtime runc --cgroup-manager cgroupfs --events-backend file)
pm() { podman "${podman_global[@]}" "$@"; }
# runc cannot start a container without explicit rlimits on this kernel ("error setting rlimit").
limits=(--ulimit nofile=20000:20000 --ulimit nproc=20000:20000)

podman_chains() {
  if command -v iptables-save >/dev/null; then
    iptables-save 2>/dev/null | sed -n 's/^:\(CNI[^ ]*\|NETAVARK[^ ]*\|PODMAN[^ ]*\) .*/\1/p' | sort
  fi
}
chains_before=$(podman_chains)
# What podman, buildah and runc write outside --root/--runroot/--tmpdir whatever their flags say:
# buildah's blob info cache, runc's state root, the network namespace mount point, podman's user
# config folder. Removed at the end when this run created them (run folders only when empty).
stray_paths=(/var/lib/containers /var/lib/cni /run/runc /run/netns /run/containers /run/libpod
  "$HOME/.config/containers")
stray_before=()
for path in "${stray_paths[@]}"; do
  [ ! -e "$path" ] || stray_before+=("$path")
done

cleanup() {
  local status=$?
  set +e
  if [ "$status" -ne 0 ] && pm container exists "$name" 2>/dev/null; then
    pm logs --tail 40 "$name" 2>&1 | sed 's/^/container-check:   kvserve: /'
  fi
  pm rm --all --force --time 0 >/dev/null 2>&1
  pm system reset --force >/dev/null 2>&1
  grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l
  rm -rf "$work"
  local path
  for path in "${stray_paths[@]}"; do
    [[ " ${stray_before[*]} " == *" $path "* ]] && continue
    case $path in
      # podman bind-mounts /run/netns onto itself (ip-netns style) when it makes it.
      /run/*) [ -z "$(ls -A "$path" 2>/dev/null)" ] && { umount "$path" 2>/dev/null; rmdir "$path" 2>/dev/null; } ;;
      *) rm -rf "$path" ;;
    esac
  done
  local chains_after
  chains_after=$(podman_chains)
  if [ "$chains_after" != "$chains_before" ]; then
    echo "container-check: FAILED: podman left iptables chains:" \
      "$(comm -13 <(echo "$chains_before") <(echo "$chains_after") | tr '\n' ' ')" >&2
    status=1
  fi
  log "cleaned up $work; total time $((SECONDS - started)) s"
  exit "$status"
}
trap cleanup EXIT

# The Debian mirror apt uses here (deb822 sources or sources.list), so the build needs nothing else.
debian_mirror() {
  local mirror
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    sed -n 's|^URIs:[[:space:]]*\([^[:space:]]*/debian\)/\?$|\1|p' | head -n1)
  [ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list 2>/dev/null |
    sed -n 's|^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*/debian\)/\?[[:space:]].*|\2|p' | head -n1)
  echo "${mirror:-http://deb.debian.org/debian}"
}

log "podman $(podman --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}'), work folder $work"
step=$SECONDS
base_tar=$cache/debian-bookworm-minbase.tar
if [ ! -s "$base_tar" ]; then
  mirror=$(debian_mirror)
  log "making the Debian 12 base with debootstrap from $mirror (cached in $base_tar)"
  rootfs=$work/rootfs
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log"; fail "debootstrap from $mirror failed"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  mkdir -p "$cache"
  tar -C "$rootfs" -c . >"$base_tar.partial" && mv "$base_tar.partial" "$base_tar"
  rm -rf "$rootfs"
else
  log "Debian 12 base from the cache: $base_tar"
fi
pm import --quiet "$base_tar" "$base" >/dev/null || fail "podman import of $base_tar failed"
log "base image ready in $((SECONDS - step)) s"

step=$SECONDS
log "podman build (CPU image: BUILDER_IMAGE=RUNTIME_IMAGE=$base, KVSERVE_CUDA=OFF)"
# Docker format keeps HEALTHCHECK (the OCI format drops it). Host network for the build's
# apt-get: no bridge, no iptables.
pm build --format docker --pull=never --network host "${limits[@]}" \
  --build-arg BUILDER_IMAGE="$base" --build-arg RUNTIME_IMAGE="$base" --build-arg KVSERVE_CUDA=OFF \
  -t "$image" -f Dockerfile . >"$work/build.log" 2>&1 ||
  { tail -n 40 "$work/build.log"; fail "podman build of the Dockerfile failed"; }
size_bytes=$(pm image inspect --format '{{.Size}}' "$image")
log "image built in $((SECONDS - step)) s; image size: $((size_bytes / 1000000)) MB ($size_bytes bytes)"

# The runtime stage holds the two binaries and their libraries: no compiler, no -dev package.
toolchain=$(pm run --rm --network none --no-healthcheck "${limits[@]}" --entrypoint sh "$image" -c \
  'dpkg-query -W -f="\${Package}\n" | grep -E -- "-dev$|^(gcc|g\+\+|cpp|clang|binutils|build-essential|make|cmake)(-[0-9.]+)?$" || true
   for c in cc c++ gcc g++ clang ld as make cmake nvcc; do command -v "$c" || true; done') ||
  fail "podman run of $image failed"
[ -z "$toolchain" ] || fail "the runtime image holds build tools: $(echo "$toolchain" | tr '\n' ' ')"
user=$(pm image inspect --format '{{.Config.User}}' "$image")
[ "${user%%:*}" = 10001 ] || fail "the image's user is '$user', not 10001"
log "runtime image: no compiler or -dev package; user $user"

# The compose file, through Debian's docker-compose (schema validation and interpolation). The
# container below runs with its kvserve service's command line and stop grace period.
resolved=$(KVSERVE_MODEL_DIR=$model docker-compose -f deploy/docker-compose.yml config 2>&1) ||
  fail "docker-compose config rejects deploy/docker-compose.yml: $resolved"
service=$(python3 -c '
import re, sys, yaml
kvserve = yaml.safe_load(sys.stdin)["services"]["kvserve"]
grace = re.fullmatch(r"(\d+)s", str(kvserve["stop_grace_period"]))
print(grace.group(1) if grace else "", *kvserve["volumes"][:1], *kvserve["command"], sep="\n")' <<<"$resolved") ||
  fail "docker-compose config: no kvserve service with stop_grace_period, volumes and command"
mapfile -t service <<<"$service"
stop_timeout_s=${service[0]}
[ -n "$stop_timeout_s" ] || fail "docker-compose config: kvserve's stop_grace_period is not in seconds"
[ "${service[1]}" = "$model:/models/gpt2:ro" ] ||
  fail "docker-compose config: the kvserve model volume resolves to ${service[1]}, not $model:/models/gpt2:ro"
serve_args=("${service[@]:2}")
log "deploy/docker-compose.yml: valid for docker-compose $(docker-compose version --short) config;" \
  "kvserve: ${serve_args[*]}, stop_grace_period ${stop_timeout_s}s"

# Two free loopback ports for gRPC and /metrics.
read -r grpc_port metrics_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
step=$SECONDS
# podman's stderr goes to a file, shown on failure: without systemd it logs an error for the
# HEALTHCHECK timer it cannot schedule (the check below runs the HEALTHCHECK itself).
pm run --detach --name "$name" --network slirp4netns "${limits[@]}" --stop-timeout "$stop_timeout_s" \
  -p "127.0.0.1:$grpc_port:50051" -p "127.0.0.1:$metrics_port:9464" \
  -v "$model:/models/gpt2:ro" "$image" "${serve_args[@]}" >/dev/null 2>"$work/podman.log" ||
  { cat "$work/podman.log"; fail "podman run of $image failed"; }
server_log() { pm logs "$name" 2>&1; }
until [[ $(server_log) == *"SERVING: "* ]]; do
  [ "$(pm inspect --format '{{.State.Running}}' "$name")" = true ] ||
    { server_log; fail "kvserve exited before SERVING"; }
  [ $((SECONDS - step)) -lt "$serving_timeout_s" ] ||
    { server_log; fail "kvserve not SERVING after $serving_timeout_s s"; }
  sleep 0.5
done
log "time to SERVING in the container: $((SECONDS - step)) s"
server_log | sed 's/^/container-check:   kvserve: /'
uid=$(pm exec "$name" id -u)
[ "$uid" = 10001 ] || fail "kvserve runs as uid $uid, not the image's 10001"

health=$("$cli" health --addr "127.0.0.1:$grpc_port") || fail "kvserve-cli health from the host: $health"
log "kvserve-cli health from the host: $health"
generated=$("$cli" generate --addr "127.0.0.1:$grpc_port" --prompt "The kernel" --max-new-tokens 16 --timeout-s 60 \
  2>"$work/generate.err") || { cat "$work/generate.err"; fail "kvserve-cli generate from the host failed"; }
grep -q 'finish_reason=LENGTH .*completion_tokens=16 ' "$work/generate.err" ||
  fail "kvserve-cli generate did not get 16 tokens: $(cat "$work/generate.err")"
log "kvserve-cli generate from the host: \"The kernel$(tr '\n' ' ' <<<"$generated")\" ($(cat "$work/generate.err"))"
metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics") || fail "/metrics did not answer"
grep -q '^kvserve_request_success_total ' <<<"$metrics" || grep -q '^kvserve_request_success_total{' <<<"$metrics" ||
  fail "/metrics has no kvserve_request_success_total after a request"
log "/metrics answers: $(grep -c '^# TYPE kvserve_' <<<"$metrics") kvserve_* families"

healthcheck=$(pm inspect --format '{{json .Config.Healthcheck.Test}}' "$name")
pm healthcheck run "$name" >/dev/null || fail "the image's HEALTHCHECK $healthcheck failed while SERVING"
log "HEALTHCHECK $healthcheck: healthy"

# SIGTERM with a request in flight: kvserve drains it (the stream completes), then exits 0.
# The request is long enough (100 tokens) to be still running when the signal comes, short enough
# to finish within the 30 s drain on a busy machine; the server's drain log line must count it.
"$cli" generate --addr "127.0.0.1:$grpc_port" --prompt "The kernel" --max-new-tokens 100 --ignore-eos --timeout-s 60 \
  >"$work/inflight.txt" 2>"$work/inflight.err" &
inflight=$!
until [ -s "$work/inflight.txt" ]; do
  kill -0 "$inflight" 2>/dev/null || break
  sleep 0.05
done
step=$SECONDS
pm stop --time "$stop_timeout_s" "$name" >/dev/null 2>>"$work/podman.log" ||
  { cat "$work/podman.log"; fail "podman stop failed"; }
stop_s=$((SECONDS - step))
exit_code=$(pm inspect --format '{{.State.ExitCode}}' "$name")
inflight_status=0
wait "$inflight" || inflight_status=$?
drain_log=$(server_log | sed -n '/received: draining/,$p')
sed 's/^/container-check:   kvserve: /' <<<"$drain_log"
log "podman stop: exit code $exit_code after $stop_s s (stop timeout $stop_timeout_s s); request in flight: exit $inflight_status, $(cat "$work/inflight.err")"
[ "$exit_code" = 0 ] || fail "kvserve exited $exit_code after SIGTERM, not 0"
[ "$stop_s" -lt "$stop_timeout_s" ] || fail "kvserve did not exit within the $stop_timeout_s s stop timeout"
[[ $drain_log == *"received: draining"*" 1 in flight"* ]] ||
  fail "kvserve's drain did not count the request in flight (it ended before SIGTERM, or SIGTERM never reached PID 1)"
if [ "$inflight_status" != 0 ] || ! grep -q 'finish_reason=LENGTH .*completion_tokens=100 ' "$work/inflight.err"; then
  fail "the request in flight at SIGTERM did not complete: $(cat "$work/inflight.err")"
fi
pm rm "$name" >/dev/null 2>>"$work/podman.log"

log "all checks passed in $((SECONDS - started)) s"
