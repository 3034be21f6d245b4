#!/usr/bin/env bash
# Installs client/python as a package, as a user would (`pip install ./client/python`), into a
# fresh virtual environment that sees Debian's python3-grpcio and python3-protobuf (no index, no
# downloads: --no-index --no-deps --no-build-isolation), then checks it against a live server
# with check_python_client.py.
# Usage: python_client_test.sh SOURCE_DIR GRPC_ADDR KVSERVE_CLI
set -euo pipefail
source_dir=$1 addr=$2 cli=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A copy keeps the build's files out of the checkout; setup.py finds proto/ two levels up.
mkdir -p "$work/src/client"
cp -r "$source_dir/client/python" "$work/src/client/python"
cp -r "$source_dir/proto" "$work/src/proto"
rm -rf "$work/src/client/python/build" "$work/src/client/python/kvserve_client/_pb"
/usr/bin/python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --no-index --no-deps --no-build-isolation \
  "$work/src/client/python"
cd "$work"  # import the installed package, not a source tree
"$work/venv/bin/python" "$source_dir/tests/client/check_python_client.py" \
  --python "$work/venv/bin/python" --addr "$addr" --cli "$cli"
