#!/usr/bin/env bash
# A memory model of QLoRA training (base kept quantized to Q4_0, LoRA r=16 on all seven linears,
# AdamW, activation checkpointing, batch 1), fitted on two model sizes and checked on a third:
#
#   peak heap = heap before the step            (quantized base + adapter + AdamW's m and v)
#             + 4 B x trainable parameters      (their gradients)
#             + a * T * L * h  +  c
#
# with T tokens, L layers and width h: `a` is the activation bytes per token per layer per unit
# of width (checkpointing keeps each layer's input; the layer being recomputed adds its own), `c`
# the output head's chunk and the rest. (A third term for the recomputed layer, b * T * (h + i),
# came out negative on two model shapes: they are too alike to separate it.) Fitted by least
# squares on
# random SmolLM2-135M- and SmolLM2-360M-shaped models at 512 and 1024 tokens, checked on
# TinyLlama-1.1B's shape at 512, then used to predict LLaMA-2-shaped models (Q4_0) at 512 tokens
# against a 16 GiB budget. Heap bytes come from the bench's counting allocator (peak RSS is
# printed beside them). Writes target/memory-model/*.json and prints markdown tables.
#
#   scripts/memory_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/memory-model
mkdir -p "$out"
cargo bench --bench train_throughput --no-run >&2
run() {  # shape tokens
    echo "== $1, $2 tokens" >&2
    cargo bench --bench train_throughput -- --random --shape "$1" --base-quant q4_0 --checkpoint-activations \
        --batch 1 --seq "$2" --steps 1 --warmup 0 --json "$out/$1-$2.json" >&2
}
for shape in smollm2-135m smollm2-360m; do
    for tokens in 512 1024; do run "$shape" "$tokens"; done
done
run tinyllama-1.1b 512
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
GIB = 2**30

def load(name):
    j = json.load(open(f"{d}/{name}.json"))
    c = j["candle_peft"]
    m = c["model_config"]
    return dict(name=name, T=j["job"]["batch"] * j["job"]["seq"], L=m["num_hidden_layers"], h=m["hidden_size"],
                i=m["intermediate_size"], before=c["heap_before_steps_bytes"], peak=c["heap_peak_bytes"],
                trainable=c["trainable_params"], rss=c["peak_memory_bytes"])

fit_runs = [load(f"{s}-{t}") for s in ("smollm2-135m", "smollm2-360m") for t in (512, 1024)]
check = load("tinyllama-1.1b-512")

def tokens_layers_width(r):
    return r["T"] * r["L"] * r["h"]

def activations(r):
    return r["peak"] - r["before"] - 4 * r["trainable"]

# Least squares on one feature and a constant.
xs, ys = [tokens_layers_width(r) for r in fit_runs], [activations(r) for r in fit_runs]
mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
c = my - a * mx
print(f"fit: a = {a:.2f} B per token per layer per unit of width, c = {c / 2**20:.0f} MiB")

def predict(r):
    return r["before"] + 4 * r["trainable"] + a * tokens_layers_width(r) + c

print("| model | tokens | heap before the step (GiB) | peak heap (GiB) | predicted (GiB) | peak RSS (GiB) |")
print("|---|---:|---:|---:|---:|---:|")
for r in fit_runs + [check]:
    tag = " (check)" if r is check else ""
    print(f"| {r['name'].rsplit('-', 1)[0]}{tag} | {r['T']} | {r['before'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
          f"{predict(r) / GIB:.2f} | {r['rss'] / GIB:.2f} |")

# Bytes before the step for a new shape: Q4_0 weights (18 bytes per 32) and f32 norms, plus 12 B per
# trainable parameter (the parameter and AdamW's two moments).
def llama(name, h, i, L, heads, kv, vocab, T=512, r=16):
    hd = h // heads
    dims = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, i), (h, i), (i, h)]
    base = L * sum(a_ * b_ for a_, b_ in dims) + 2 * vocab * h
    trainable = L * sum(r * (a_ + b_) for a_, b_ in dims)
    before = base * 18 / 32 + 12 * trainable + (2 * L + 1) * h * 4
    shape = dict(name=name, T=T, L=L, h=h, i=i, before=before, trainable=trainable)
    return shape, base

print()
print("| LLaMA-2 shape (Q4_0, LoRA r=16 on all linears, 512 tokens) | parameters | predicted peak heap (GiB) | fits in 16 GiB |")
print("|---|---:|---:|---|")
for args in [("7B", 4096, 11008, 32, 32, 32, 32000), ("13B", 5120, 13824, 40, 40, 40, 32000),
             ("34B", 8192, 22016, 48, 64, 8, 32000), ("70B", 8192, 28672, 80, 64, 8, 32000)]:
    shape, base = llama(*args)
    p = predict(shape)
    print(f"| {args[0]} | {base / 1e9:.1f}B | {p / GIB:.1f} | {'yes' if p < 16 * GIB else 'no'} |")

# The largest of LLaMA-2's 7B/13B proportions (h = 128 L, i = 2.7 h rounded to 256, head dim 128)
# whose predicted peak heap, plus 0.1 GiB of RSS over the heap as measured above, stays in 16 GiB.
best = None
for L in range(8, 200):
    h = 128 * L
    shape, base = llama(f"L{L}", h, round(2.7 * h / 256) * 256, L, L, L, 32000)
    if predict(shape) + 0.1 * GIB > 16 * GIB:
        break
    best = (L, h, base, predict(shape))
L, h, base, p = best
print(f"\nlargest LLaMA-2-proportioned model predicted to train in 16 GiB (512 tokens, Q4_0, LoRA r=16): "
      f"{L} layers of width {h}, {base / 1e9:.1f}B parameters, {p / GIB:.1f} GiB peak heap")
PY
