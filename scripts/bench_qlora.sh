#!/usr/bin/env bash
# QLoRA memory and speed on this machine: the `train_throughput` bench (SmolLM2-135M-Instruct,
# LoRA r=16 on all seven linears of every layer, AdamW, f32 compute) with the frozen base
# dequantized to f32 (`--base-quant none`) and kept in the GGUF's own Q4_1 (`--base-quant keep`),
# each with and without activation checkpointing: one process each (peak RSS is per process),
# back to back in one invocation of this script.
#
#   scripts/bench_qlora.sh [--steps N] [--batch N] [--seq N]     (defaults 3, 4, 256)
#   scripts/bench_qlora.sh --by-length "512 2048" [--steps N]     (batch 1 at each length)
#
# Prints a markdown table (tokens/s, peak RSS, and keep / none ratios) and writes each run's JSON
# summary to target/bench-qlora/. `--by-length`: one row per sequence length, the f32 base
# without checkpointing against the Q4_1 base kept quantized with checkpointing.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=3 batch=4 seq=256 lengths=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --by-length) lengths="$2"; shift 2 ;;
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
if [[ -n "$lengths" ]]; then
    for len in $lengths; do
        for run in "none" "keep --checkpoint-activations"; do
            set -- $run
            echo "== $len tokens, --base-quant $*" >&2
            cargo bench --bench train_throughput -- --base-quant "$@" --steps "$steps" --warmup 1 --batch 1 \
                --seq "$len" --json "$out/len$len-$1.json" >&2
        done
    done
    python3 - "$out" $lengths <<'PY'
import json, sys
d, lengths = sys.argv[1], sys.argv[2:]
print("| tokens (batch 1) | f32 tokens/s | f32 peak RSS (GiB) | Q4_1 + checkpointing tokens/s | Q4_1 + checkpointing peak RSS (GiB) |")
print("|---:|---:|---:|---:|---:|")
for n in lengths:
    f, k = (json.load(open(f"{d}/len{n}-{q}.json"))["candle_peft"] for q in ("none", "keep"))
    print(f"| {n} | {f['tokens_per_s']:.1f} | {f['peak_memory_bytes'] / 2**30:.2f} | "
          f"{k['tokens_per_s']:.1f} | {k['peak_memory_bytes'] / 2**30:.2f} |")
PY
    exit 0
fi
for quant in none keep; do
    for ckpt in "" --checkpoint-activations; do
        echo "== --base-quant $quant $ckpt" >&2
        cargo bench --bench train_throughput -- --base-quant "$quant" $ckpt --steps "$steps" --batch "$batch" \
            --seq "$seq" --json "$out/$quant${ckpt:+-ckpt}.json" >&2
    done
done
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
names = ("none", "none-ckpt", "keep", "keep-ckpt")
runs = {q: json.load(open(f"{d}/{q}.json")) for q in names}
job = runs["none"]["job"]
print(f"SmolLM2-135M-Instruct Q4_1, {job['adapter']}, batch {job['batch']} x {job['seq']}, "
      f"{job['steps']} timed steps, features {job['features']}")
print("| frozen base | checkpointing | tokens/s | peak RSS (GiB) | tokens/s vs f32 | peak RSS vs f32 |")
print("|---|---|---:|---:|---:|---:|")
base = runs["none"]["candle_peft"]
for q in names:
    c = runs[q]["candle_peft"]
    label = "Q4_1 kept quantized" if q.startswith("keep") else "f32 (dequantized on load)"
    print(f"| {label} | {'yes' if q.endswith('ckpt') else 'no'} | {c['tokens_per_s']:.1f} | "
          f"{c['peak_memory_bytes'] / 2**30:.2f} | {c['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
          f"{c['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x |")
PY
