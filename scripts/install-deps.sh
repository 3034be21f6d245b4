#!/usr/bin/env bash
# Installs every Debian 12 package that kvserve's build, tests and tools need.
# The README, CI (.ci/run) and the Dockerfile all call this one script, so they cannot drift.
# The Dockerfile's builder is Ubuntu 24.04 (NVIDIA's CUDA images): every name below is the same
# package there. Only the runtime libraries were renamed (the t64 transition), which is why the
# runtime image derives its packages from the built binaries (scripts/runtime-packages.sh).
# prometheus (for promtool) and python3-yaml serve the deploy/ checks in tests/deploy;
# python3-grpcio and python3-protobuf the Python client (client/python; python3-venv, python3-pip
# and python3-setuptools install it in its test, with no index), python3-matplotlib
# bench/plot.py. libcpp-httplib-dev serves the HTTP port (/metrics, /health, /v1/*); the OpenAI
# SDK test (tests/http) needs Node 20 and npm, which are not Debian 12's (tests/README.md).
# openssl makes the throwaway certificates of the TLS tests; clang and libclang-rt-14-dev (its
# sanitizer and libFuzzer runtimes) build fuzz/ (scripts/fuzz.sh); curl serves
# scripts/fetch-model.sh.
# Usage: scripts/install-deps.sh   (as root, or with sudo available)
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config ccache git xz-utils
  liblzma-dev libpcre2-dev
  nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc prometheus-cpp-dev
  libcpp-httplib-dev
  prometheus python3-yaml python3-grpcio python3-protobuf python3-matplotlib
  python3-venv python3-pip python3-setuptools curl
  openssl clang libclang-rt-14-dev
)
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
