#!/usr/bin/env bash
# QLoRA memory and speed on this machine: the `train_throughput` bench (SmolLM2-135M-Instruct,
# LoRA r=16 on all seven linears of every layer, AdamW, f32 compute) with the frozen base
# dequantized to f32 (`--base-quant none`) and kept in the GGUF's own Q4_1 (`--base-quant keep`),
# one process each (peak RSS is per process), back to back in one invocation of this script.
#
#   scripts/bench_qlora.sh [--steps N] [--batch N] [--seq N]     (defaults 3, 4, 256)
#
# Prints a markdown table (tokens/s, peak RSS, and keep / none ratios) and writes each run's JSON
# summary to target/bench-qlora/.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=3 batch=4 seq=256
while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --batch) batch="$2"; shift 2 ;;
        --seq) seq="$2"; shift 2 ;;
        *) echo "unknown option $1 (see the comment at the top of $0)" >&2; exit 2 ;;
    esac
done
scripts/fetch_smollm2.sh >&2
out=target/bench-qlora
mkdir -p "$out"
cargo bench --bench train_throughput --no-run >&2
for quant in none keep; do
    echo "== --base-quant $quant" >&2
    cargo bench --bench train_throughput -- --base-quant "$quant" --steps "$steps" --batch "$batch" \
        --seq "$seq" --json "$out/$quant.json" >&2
done
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
runs = {q: json.load(open(f"{d}/{q}.json")) for q in ("none", "keep")}
job = runs["none"]["job"]
print(f"SmolLM2-135M-Instruct Q4_1, {job['adapter']}, batch {job['batch']} x {job['seq']}, "
      f"{job['steps']} timed steps, features {job['features']}")
print("| frozen base | tokens/s | peak RSS (GiB) |\n|---|---:|---:|")
for q, label in (("none", "f32 (dequantized on load)"), ("keep", "Q4_1 kept quantized")):
    c = runs[q]["candle_peft"]
    print(f"| {label} | {c['tokens_per_s']:.1f} | {c['peak_memory_bytes'] / 2**30:.2f} |")
n, k = runs["none"]["candle_peft"], runs["keep"]["candle_peft"]
print(f"| ratio (kept / f32) | {k['tokens_per_s'] / n['tokens_per_s']:.2f}x | "
      f"{k['peak_memory_bytes'] / n['peak_memory_bytes']:.2f}x |")
PY
