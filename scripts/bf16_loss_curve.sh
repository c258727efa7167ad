#!/usr/bin/env bash
# bf16 against f32 training on SmolLM2-135M-Instruct: 50 steps of LoRA (the CLI's defaults,
# r=8), batch 2 x 128 tokens, the same data, seed and learning rate: with an f32 base, with a
# bf16 base (`--dtype bf16`: bf16 frozen weights and activations; f32 adapter, optimizer state and
# loss), and with a bf16 base computing in f32 (`--base-quant bf16`, the fast one on the CPU).
# Prints each bf16 curve's largest relative difference from the f32 curve per step and fails
# above 2%.
#
#   scripts/bf16_loss_curve.sh [data.jsonl]      (default: text records cut from the docs)
#
# Writes to target/bf16-loss-curve/. Takes a few minutes on 2 cores. Builds with $FEATURES
# (cargo features, e.g. FEATURES=mkl) in $CARGO_TARGET_DIR (default target), so the same curves
# can be taken on the bench's fastest build:
#   eval "$(scripts/setup_mkl.sh)"; MKLROOT=$MKLROOT FEATURES=mkl CARGO_TARGET_DIR=target/mkl-native \
#       RUSTFLAGS="-C target-cpu=native" scripts/bf16_loss_curve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bf16-loss-curve
mkdir -p "$out"
scripts/fetch_smollm2.sh >&2
data="${1:-$out/data.jsonl}"
if [[ $# -eq 0 ]]; then
    python3 - "$data" <<'EOF'
import json, re, sys
text = "".join(open(f).read() for f in ["README.md", "docs/METHODS.md", "CONTRIBUTING.md"])
paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 200]
with open(sys.argv[1], "w") as f:
    for p in paragraphs:
        f.write(json.dumps({"text": p}) + "\n")
EOF
fi
cargo build --quiet --release --bin candle-peft ${FEATURES:+--features "$FEATURES"}
bin="${CARGO_TARGET_DIR:-target}/release/candle-peft"
for run in "f32 --dtype f32" "bf16 --dtype bf16" "bf16-base --dtype f32 --base-quant bf16"; do
    set -- $run
    name="$1"
    shift
    rm -rf "$out/$name"
    "$bin" train --model models/SmolLM2-135M-Instruct.Q4_1.gguf --data "$data" \
        --output "$out/$name" --steps 50 --batch-size 2 --max-len 128 --lr 1e-4 "$@" \
        >"$out/$name.log" 2>&1 || { cat "$out/$name.log" >&2; exit 1; }
done
python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
curve = lambda d: [json.loads(l)["loss"] for l in open(f"{out}/{d}/metrics.jsonl")]
f32 = curve("f32")
print(f"f32 loss {f32[0]:.4f} -> {f32[-1]:.4f}")
ok = True
for name in ["bf16", "bf16-base"]:
    other = curve(name)
    assert len(f32) == len(other) == 50, (len(f32), len(other))
    rel = [abs(b - f) / abs(f) for f, b in zip(f32, other)]
    worst = max(range(50), key=lambda i: rel[i])
    print(f"{name} loss {other[0]:.4f} -> {other[-1]:.4f}: largest relative difference from f32 "
          f"{100 * rel[worst]:.2f}% at step {worst + 1}; mean {100 * sum(rel) / 50:.2f}%")
    ok = ok and rel[worst] <= 0.02
sys.exit(0 if ok else 1)
EOF
