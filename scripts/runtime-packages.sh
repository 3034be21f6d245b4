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

# dpkg records a file under the path its package shipped it at; with merged /usr the loader may
# report /lib/... for a file recorded as /usr/lib/... (or the reverse), and alternatives add
# symlinks, so try the reported path, its /usr twin and the resolved path, in that order.
# One dpkg-query for all of them: each call reads every package's file list (about a second on a
# busy machine), and the binaries load dozens of libraries.
candidates() { printf '%s\n' "$1" "/usr$1" "${1#/usr}" "$(readlink -f "$1")"; }
mapfile -t libs < <(printf '%s\n' "${libs[@]}" | sort -u)
mapfile -t paths < <(for lib in "${libs[@]}"; do candidates "$lib"; done)
declare -A owner
# Lines are "package[:arch][, package...]: path"; paths owned by several packages name them all.
while IFS= read -r line; do
  [[ $line == *": /"* ]] || continue
  package=${line%%: /*}
  package=${package%%,*}
  owner[${line#*: }]=${package%%:*}
done < <(dpkg-query -S "${paths[@]}" 2>/dev/null || true)
for lib in "${libs[@]}"; do
  found=""
  while read -r candidate; do
    if [ -n "${owner[$candidate]:-}" ]; then
      found=${owner[$candidate]}
      break
    fi
  done < <(candidates "$lib")
  [ -n "$found" ] || { echo "runtime-packages: no package owns $lib" >&2; exit 1; }
  echo "$found"
done | sort -u
