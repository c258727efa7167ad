#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU, its driver and PyTorch (+ PEFT), and
# no Rust toolchain or network. Everything it runs is built beforehand on a CPU machine by
# `scripts/build_cuda.sh --package` into target/gpu-check/ (stripped, xz-compressed binaries; no
# model file):
#
#   scripts/gpu_check.sh [OUT_DIR]        # from the repo root; OUT_DIR defaults to target/gpu-check/out
#
# 1. target/gpu-check/gpu-tests: every adapter method's forward, merged weight and gradients on
#    the device against the same computation on the CPU (tests/gpu.rs; f32, and a bf16 base).
# 2. target/gpu-check/train-throughput: the training job of benches/train_throughput.rs on both
#    sides (candle-peft, then PyTorch + PEFT with benches/train_throughput_peft.py): a random model
#    of SmolLM2-135M's shape, LoRA r=16 on all seven linears, batch 8 x 512, f32 and bf16 bases,
#    tokens/s and peak device memory of each.
# 3. OUT_DIR/gpu_check.json: one summary of both.
#
# Environment: CANDLE_PEFT_TEST_DEVICE (default cuda:0), PYTHON (default python3), and, to prove
# the script on a small machine, BATCH / SEQ / STEPS / WARMUP (default 8 / 512 / 5 / 2). On a
# machine without a driver, CUDA_LIBS may name a folder with libcuda.so.1 (build_cuda.sh's stub)
# so that the binaries start; they then run on the CPU only.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/gpu-check/out}
bin=target/gpu-check
device=${CANDLE_PEFT_TEST_DEVICE:-cuda:0}
python=${PYTHON:-python3}
batch=${BATCH:-8} seq=${SEQ:-512} steps=${STEPS:-5} warmup=${WARMUP:-2}
mkdir -p "$out"
for b in gpu-tests train-throughput; do
  [ -f "$bin/$b.xz" ] || { echo "error: $bin/$b.xz is missing: run scripts/build_cuda.sh --package on a build machine" >&2; exit 2; }
  "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bin/$b.xz" "$out/$b" && chmod +x "$out/$b" || exit 2
done
bin=$out

# The CUDA libraries the binaries link (cuBLAS, cuRAND, NVRTC, the runtime) from PyTorch's wheels.
cuda_lib=$("$python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=${CUDA_LIBS:+$CUDA_LIBS:}${cuda_lib:+$cuda_lib:}${LD_LIBRARY_PATH:-}
export CANDLE_PEFT_ROOT=$PWD CANDLE_PEFT_TEST_DEVICE=$device
if ldd "$bin/gpu-tests" | grep -q "not found"; then
  echo "error: shared libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
  ldd "$bin/gpu-tests" | grep "not found" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || echo "no GPU" > "$out/gpu.txt"
started=$(date +%s)

echo "== gpu-tests on $device" >&2
timeout 150 "$bin/gpu-tests" --test-threads 1 > "$out/gpu-tests.log" 2>&1
tests_rc=$?
cat "$out/gpu-tests.log"

for dtype in f32 bf16; do
  echo "== train-throughput on $device, $dtype base, batch $batch x $seq" >&2
  timeout 200 "$bin/train-throughput" --random --device "$device" --dtype "$dtype" --batch "$batch" --seq "$seq" \
    --steps "$steps" --warmup "$warmup" --python "$python" --json "$out/throughput-$dtype.json" \
    > "$out/throughput-$dtype.log" 2>&1
  echo "exit $?" >> "$out/throughput-$dtype.log"
  tail -n 6 "$out/throughput-$dtype.log"
done

"$python" - "$out" "$tests_rc" "$(( $(date +%s) - started ))" "$device" <<'PY'
import json, os, sys
out, tests_rc, seconds, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
summary = {"device": device, "gpu": open(os.path.join(out, "gpu.txt")).read().strip(), "seconds": seconds,
           "gpu_tests": {"passed": tests_rc == 0, "exit_code": tests_rc,
                         "result": [l for l in open(os.path.join(out, "gpu-tests.log")) if l.startswith("test result")]}}
for dtype in ["f32", "bf16"]:
    path = os.path.join(out, f"throughput-{dtype}.json")
    summary[f"throughput_{dtype}"] = json.load(open(path)) if os.path.exists(path) else {"error": open(
        os.path.join(out, f"throughput-{dtype}.log")).read()[-2000:]}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
[ "$tests_rc" -eq 0 ]
