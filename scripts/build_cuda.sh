#!/usr/bin/env bash
# Builds candle-peft with the `cuda` feature on a machine without a GPU or a system CUDA toolkit
# (CI, these VMs): the library, the CLI, the GPU test binary (tests/gpu.rs) and the training
# throughput job (benches/train_throughput.rs), for compute capability 9.0 (H100 / H200) unless
# CUDA_COMPUTE_CAP says otherwise.
#
#   scripts/build_cuda.sh            # build (and check that it links)
#   scripts/build_cuda.sh --package  # also put the two GPU programs, stripped and xz-compressed
#                                    # (candle's PTX makes each ~60 MB; ~1/10 compressed), in
#                                    # target/gpu-check/ for scripts/gpu_check.sh on a GPU machine
#
# How (../shared/CUDA.md has the background):
# - The toolkit comes from PyPI, pinned to CUDA 13.0 (the GPU machines' driver supports 13.0;
#   PTX from a newer nvcc may not load there), in a venv under the cache directory.
# - cudarc (candle's CUDA bindings) links libcuda, the driver, which only a GPU machine has: a
#   link-time stub with the same soname and the `cu*` symbols cudarc declares is made here, as
#   the toolkit's own lib64/stubs/libcuda.so would be; at run time the real driver is used.
# - The target directory lives under the cache too (CANDLE_PEFT_CUDA_TARGET to move it), so a
#   warm machine rebuilds only what changed; candle's kernels take about 11 minutes cold on 2
#   cores.
# Cache: ${CANDLE_PEFT_CUDA_CACHE:-~/.cache/candle-peft/cuda}.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${CANDLE_PEFT_CUDA_CACHE:-$HOME/.cache/candle-peft/cuda}
venv=$cache/venv
packages=(
  "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
  "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand"
)
stamp=$venv/.candle-peft-packages
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${packages[*]}" ]; then
  echo "== CUDA toolkit 13.0 from PyPI into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
  echo "${packages[*]}" > "$stamp"
fi
toolkit=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$toolkit/bin/nvcc" ] || { echo "error: no nvcc in $toolkit/bin" >&2; exit 1; }

# Unversioned names for the libraries the linker looks for, and the driver stub.
links=$cache/link
mkdir -p "$links"
for lib in cudart nvrtc curand cublas cublasLt; do
  so=$(ls "$toolkit"/lib/lib$lib.so.* 2>/dev/null | sort | head -n 1)
  [ -n "$so" ] || { echo "error: lib$lib.so.* not found in $toolkit/lib" >&2; exit 1; }
  ln -sf "$so" "$links/lib$lib.so"
done
cargo fetch --quiet
cudarc=$(cargo metadata --features cuda --format-version 1 |
  python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
cudarc=$(dirname "$cudarc")
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | sed 's/^pub unsafe fn //' | sort -u |
  awk '{ print "int " $1 "(void) { return 999; /* CUDA_ERROR_UNKNOWN: a link-time stub */ }" }' > "$cache/libcuda_stub.c"
[ -s "$cache/libcuda_stub.c" ] || { echo "error: no cu* functions found in $cudarc" >&2; exit 1; }
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$cache/libcuda_stub.c"
ln -sf libcuda.so "$links/libcuda.so.1" # lets the binaries start on a machine without a driver

export PATH=$toolkit/bin:$PATH CUDA_ROOT=$toolkit CUDA_PATH=$toolkit CUDA_HOME=$toolkit
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$links${LIBRARY_PATH:+:$LIBRARY_PATH}
export CARGO_TARGET_DIR=${CANDLE_PEFT_CUDA_TARGET:-$cache/target}

echo "== cargo build --release --features cuda (lib, CLI, tests/gpu.rs, benches/train_throughput.rs) into $CARGO_TARGET_DIR" >&2
started=$(date +%s)
cargo build --release --features cuda --lib --bin candle-peft --bench train_throughput
gpu_test=$(cargo test --release --features cuda --test gpu --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
bench=$(cargo build --release --features cuda --bench train_throughput --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_throughput" and m.get("executable"):
        print(m["executable"])')
echo "== built in $(( $(date +%s) - started )) s: $gpu_test, $bench" >&2

if [ "${1:-}" = "--package" ]; then
  out=target/gpu-check
  mkdir -p "$out"
  rm -f "$out/gpu-tests" "$out/train-throughput"
  strip -o "$out/gpu-tests" "$gpu_test"
  strip -o "$out/train-throughput" "$bench"
  xz -f -6 -T0 "$out/gpu-tests" "$out/train-throughput"
  du -h "$out"/*.xz >&2
fi
