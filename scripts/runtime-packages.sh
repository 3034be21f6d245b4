#!/usr/bin/env bash
# Prints, one a line, the distribution packages that own the shared libraries the given binaries
# load. The Dockerfile's runtime stage installs exactly this list, so the image carries only what
# the binaries need and never a hand-kept list of library package names, which differ between
# Debian 12 and Ubuntu 24.04 (libgrpc++1.51 vs libgrpc++1.51t64, ...).
# CUDA's own libraries (under /usr/local/cuda*) are skipped: the CUDA runtime image provides them.
# The driver's libraries are skipped too: the NVIDIA Container Toolkit mounts them at run time.
# Usage: scripts/runtime-packages.sh BINARY...
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
for binary in "$@"; do
  [ -f "$binary" ] || { echo "runtime-packages: $binary: no such file" >&2; exit 1; }
done

# dpkg records a file under the path its package shipped it at; with merged /usr the loader may
# report /lib/... for a file recorded as /usr/lib/... (or the reverse), and alternatives add
# symlinks, so try the reported path, its /usr twin and the resolved path.
owner() {
  local path=$1 candidate
  for candidate in "$path" "/usr$path" "${path#/usr}" "$(readlink -f "$path")"; do
    if dpkg-query -S "$candidate" >/dev/null 2>&1; then
      dpkg-query -S "$candidate" | head -n1 | cut -d: -f1
      return 0
    fi
  done
  echo "runtime-packages: no package owns $path" >&2
  return 1
}

missing=0
libs=()
while read -r name arrow path _; do
  [ "$arrow" = "=>" ] || continue
  case "$path" in
    /usr/local/cuda*) ;;
    not)
      case "$name" in
        libcuda.so.* | libnvidia-*) ;;
        *) echo "runtime-packages: $name not found" >&2; missing=1 ;;
      esac
      ;;
    /*) libs+=("$path") ;;
  esac
done < <(ldd "$@" | grep -v ':$')
[ "$missing" -eq 0 ] || exit 1
[ ${#libs[@]} -gt 0 ] || exit 0

for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  owner "$lib" || exit 1
done | sort -u
