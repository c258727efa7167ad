#!/usr/bin/env bash
# Side-by-side training throughput, candle-peft against PyTorch + PEFT, on this machine's CPU:
# the `train_throughput` bench (SmolLM2-135M-Instruct, all seven linears of every layer, batch
# 4 x 256, AdamW), one run per line, each run timing both sides one after the other.
#
#   scripts/bench_vs_pytorch.sh [--python <venv python with torch and peft>] [--no-mkl]
#                               [--steps N] [--repeat N] [--quick]
#
# Runs: LoRA f32, bf16 (bf16 activations) and a bf16 base computing in f32 (`--base-quant bf16`;
# PyTorch in bf16), DoRA f32, VeRA f32 on the default build (pure Rust, portable: gemm, with
# its AVX-512 kernels where the CPU has them), then the same jobs on the fastest build: the `mkl`
# feature (Intel MKL from PyPI, laid out by scripts/setup_mkl.sh; bf16 products in MKL's bf16
# GEMM) compiled with `-C target-cpu=native` (--no-mkl skips it). `--quick`: LoRA f32 on the
# default build only.
# Without --python it makes a venv (~/.cache/candle-peft/bench-venv) with the pinned torch,
# peft, transformers and gguf of tests/fixtures/requirements.txt. Everything it sets up is
# reused by the next run. Prints each run's `| ratio | ... |` line (candle-peft / PyTorch:
# tokens/s, peak RSS) and writes every run's JSON summary to target/bench-vs-pytorch/.
# `--repeat N` runs each job N times (each run times both sides, one after the other) and
# prints, after the runs, each side's median tokens/s and peak RSS and their ratio: a shared VM's
# speed drifts by 10-20% from one minute to the next, so one run's ratio is not a figure to quote.
set -euo pipefail
cd "$(dirname "$0")/.."

python="" mkl=1 steps=5 quick=0 repeat=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        --no-mkl) mkl=0; shift ;;
        --steps) steps="$2"; shift 2 ;;
        --repeat) repeat="$2"; shift 2 ;;
        --quick) quick=1; mkl=0; shift ;;
        *) echo "unknown option $1 (see the comment at the top of $0)" >&2; exit 2 ;;
    esac
done

if [[ -z "$python" ]]; then
    venv="$HOME/.cache/candle-peft/bench-venv"
    if [[ ! -f "$venv/.done" ]]; then
        echo "making $venv (torch, peft, transformers, gguf from PyPI)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet -r tests/fixtures/requirements.txt
        touch "$venv/.done"
    fi
    python="$venv/bin/python"
fi
scripts/fetch_smollm2.sh >&2

out=target/bench-vs-pytorch
rm -rf "$out" && mkdir -p "$out"
echo "# $(date -u +%Y-%m-%d) $(git rev-parse --short HEAD) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores;" \
    "AVX-512: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"

run() { # build-name features json-name bench-args...
    local build="$1" features="$2" name="$3" i
    shift 3
    for ((i = 1; i <= repeat; i++)); do
        local log="$out/$name-$i.log"
        cargo bench --quiet --bench train_throughput $features -- --python "$python" --steps "$steps" \
            --json "$out/$name-$i.json" "$@" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
        echo "| $build | $* | $i | $(grep '^| ratio |' "$log" | cut -d'|' -f3-)"
    done
    if ((repeat > 1)); then
        "$python" - "$build" "$*" "$out/$name"-*.json <<'EOF'
import json, statistics, sys
runs = [json.load(open(p)) for p in sys.argv[3:]]
med = lambda f: statistics.median(f(r) for r in runs)
ours, theirs = med(lambda r: r["candle_peft"]["tokens_per_s"]), med(lambda r: r["pytorch"]["tokens_per_s"])
our_mem, their_mem = med(lambda r: r["candle_peft"]["peak_memory_bytes"]), med(lambda r: r["pytorch"]["peak_memory_bytes"])
print(f"| {sys.argv[1]} | {sys.argv[2]} | median of {len(runs)}: PyTorch {theirs:.1f} tokens/s "
      f"{their_mem / 2**30:.2f} GiB, candle-peft {ours:.1f} tokens/s {our_mem / 2**30:.2f} GiB | "
      f"{ours / theirs:.2f}x | {our_mem / their_mem:.2f}x |")
EOF
    fi
}

echo "| build | job | run | tokens/s ratio | peak RSS ratio |"
echo "|---|---|---|---:|---:|"
run default "" lora-f32 --method lora --dtype f32
if [[ $quick == 0 ]]; then
    run default "" lora-bf16 --method lora --dtype bf16
    run default "" lora-bf16-base --method lora --dtype f32 --base-quant bf16 --python-dtype bf16
    run default "" dora-f32 --method dora --dtype f32
    run default "" vera-f32 --method vera --dtype f32
fi
if [[ $mkl == 1 ]]; then
    eval "$(scripts/setup_mkl.sh)"
    # The fastest build: MKL, and code generated for this CPU (candle's bf16 element-wise ops
    # inline their AVX512-BF16 conversions only then). Its own target dir: RUSTFLAGS change every
    # crate's build.
    export MKLROOT CARGO_TARGET_DIR=target/mkl-native RUSTFLAGS="-C target-cpu=native"
    run "mkl, native" "--features mkl" mkl-lora-f32 --method lora --dtype f32
    run "mkl, native" "--features mkl" mkl-lora-bf16 --method lora --dtype bf16
    run "mkl, native" "--features mkl" mkl-lora-bf16-base --method lora --dtype f32 --base-quant bf16 --python-dtype bf16
    run "mkl, native" "--features mkl" mkl-dora-f32 --method dora --dtype f32
    run "mkl, native" "--features mkl" mkl-vera-f32 --method vera --dtype f32
fi
