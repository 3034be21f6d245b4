# Sourced by the bench drivers right after they cd to the repository root, with caller_dir set to
# the directory they were started from. An output path on their command line is taken from the
# caller's directory, as any command's would be; without one they write to a scratch folder, so
# that a bare run never overwrites the results committed in docs/ (pass docs/... to update them).
scratch_root=${KVSERVE_BENCH_OUT:-${TMPDIR:-/tmp}/kvserve-bench}

# output_path ARG NAME: ARG made absolute against caller_dir, or $scratch_root/NAME when ARG is "".
output_path() {
  local arg=$1 name=$2
  if [ -z "$arg" ]; then
    printf '%s/%s\n' "$scratch_root" "$name"
  elif [ "${arg#/}" != "$arg" ]; then
    printf '%s\n' "$arg"
  else
    printf '%s/%s\n' "$caller_dir" "$arg"
  fi
}
