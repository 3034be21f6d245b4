#!/usr/bin/env bash
# Installs the Debian 12 packages that kvserve's build, tests and tools need.
# The README, CI (.ci/run) and the Dockerfile all call this one script, so they cannot drift.
# The Dockerfile's builder is Ubuntu 24.04 (NVIDIA's CUDA images) or Debian 12 (the CPU image):
# every name below is the same package in both. Only the runtime libraries were renamed (the t64
# transition), which is why the runtime image derives its packages from the built binaries
# (scripts/runtime-packages.sh).
# Groups:
#   build      compiles kvserve and kvserve-cli (all CMake targets configure with it; cpp-httplib
#              serves the HTTP port: /metrics, /health, /v1/*); the Dockerfile's builder installs
#              only this group, so the image build stays lean.
#   tools      the rest that the tests and tools use: prometheus (for promtool) and python3-yaml
#              serve the deploy/ checks in tests/deploy; python3-grpcio and python3-protobuf the
#              Python client (client/python; python3-venv, python3-pip and python3-setuptools
#              install it in its test, with no index), python3-matplotlib bench/plot.py. openssl
#              makes the throwaway certificates of the TLS tests; clang and libclang-rt-14-dev (its
#              sanitizer and libFuzzer runtimes) build fuzz/ (scripts/fuzz.sh); curl serves
#              scripts/fetch-model.sh. The OpenAI SDK test (tests/http) needs Node 20 and npm,
#              which are not Debian 12's (tests/README.md).
#   container  podman and what scripts/container-check.sh needs to build and run the image
#              offline: debootstrap (the Debian base image), runc (crun fails on hybrid cgroups),
#              slirp4netns (published ports without a CNI bridge), docker-compose (validates
#              deploy/docker-compose.yml); only that script asks for it.
# Usage: scripts/install-deps.sh [GROUP...]   (as root, or with sudo available)
#   no GROUP = build and tools, what scripts/test.sh needs.
set -euo pipefail
declare -A groups=(
  [build]="build-essential cmake ninja-build pkg-config ccache git xz-utils
    liblzma-dev libpcre2-dev
    nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
    libgtest-dev libgmock-dev libbenchmark-dev
    libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc prometheus-cpp-dev
    libabsl-dev libcpp-httplib-dev"
  [tools]="prometheus python3-yaml python3-grpcio python3-protobuf python3-matplotlib
    python3-venv python3-pip python3-setuptools curl
    openssl clang libclang-rt-14-dev"
  [container]="podman buildah runc slirp4netns debootstrap docker-compose curl"
)
[ $# -gt 0 ] || set -- build tools
packages=()
for group in "$@"; do
  [ -n "${groups[$group]+set}" ] || { echo "install-deps: unknown group $group (build, tools, container)" >&2; exit 2; }
  read -r -d "" -a names <<<"${groups[$group]}" || true
  packages+=("${names[@]}")
done
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
