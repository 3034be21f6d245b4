#!/usr/bin/env bash
# Downloads an official GPT-2 checkpoint from the Hugging Face hub into DIR, ready for
# `kvserve serve --model DIR`.
# Usage: scripts/fetch-model.sh gpt2|gpt2-medium|gpt2-large|gpt2-xl [DIR]   (default DIR: ./NAME)
# Fetches config.json, model.safetensors, vocab.json and merges.txt from
# $HF_ENDPOINT/openai-community/NAME/resolve/main/FILE (HF_ENDPOINT defaults to
# https://huggingface.co, a mirror may stand in), sending HF_TOKEN as a bearer token when set, as the
# hub's own tools do. A file already complete is skipped; a partial one is resumed (curl -C -) or,
# where the server cannot resume, fetched again. Every file's size is checked against the one the
# server announces. Exit status: 0 when all four files are complete, 1 on a download or size
# error, 2 on a usage error.
set -euo pipefail

usage() {
  echo "usage: $0 gpt2|gpt2-medium|gpt2-large|gpt2-xl [DIR]" >&2
  exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
name=$1
case $name in
  gpt2 | gpt2-medium | gpt2-large | gpt2-xl) ;;
  *) echo "fetch-model: unknown model '$name'" >&2; usage ;;
esac
dir=${2:-$name}
endpoint=${HF_ENDPOINT:-https://huggingface.co}
endpoint=${endpoint%/}
auth=()
[ -z "${HF_TOKEN:-}" ] || auth=(-H "Authorization: Bearer $HF_TOKEN")
mkdir -p "$dir"

# The size the server announces for URL (the last Content-Length along the redirects: the hub
# sends large files on to its CDN), or nothing when it announces none.
announced_size() {
  curl -sSfIL "${auth[@]}" "$1" | tr -d '\r' |
    awk 'tolower($1) == "content-length:" { size = $2 } END { if (size != "") print size }'
}

for file in config.json vocab.json merges.txt model.safetensors; do
  url=$endpoint/openai-community/$name/resolve/main/$file
  target=$dir/$file
  expected=$(announced_size "$url") || { echo "fetch-model: cannot reach $url" >&2; exit 1; }
  if [ -n "$expected" ] && [ -f "$target" ] && [ "$(stat -c %s "$target")" = "$expected" ]; then
    echo "fetch-model: $target is complete ($expected bytes)" >&2
    continue
  fi
  if [ -n "$expected" ] && [ -f "$target" ] && [ "$(stat -c %s "$target")" -gt "$expected" ]; then
    rm -f "$target"  # longer than the server's file: not a prefix of it
  fi
  echo "fetch-model: $url -> $target" >&2
  status=0
  curl -fL --retry 3 "${auth[@]}" -C - -o "$target" "$url" || status=$?
  if [ "$status" = 33 ]; then  # the server cannot resume (no byte ranges): fetch it whole
    rm -f "$target"
    status=0
    curl -fL --retry 3 "${auth[@]}" -o "$target" "$url" || status=$?
  fi
  if [ "$status" != 0 ]; then
    echo "fetch-model: downloading $url failed (curl exit status $status)" >&2
    exit 1
  fi
  got=$(stat -c %s "$target")
  if [ -n "$expected" ] && [ "$got" != "$expected" ]; then
    echo "fetch-model: $target has $got bytes, the server announced $expected" >&2
    exit 1
  fi
done
echo "fetch-model: $dir holds $name; serve it with: kvserve serve --model $dir" >&2
