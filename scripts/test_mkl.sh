#!/usr/bin/env bash
# The library's and the integration tests on the `mkl` build (release profile, its own target
# dir, target/mkl). MKL's products take other operands than gemm's (candle's MKL path refuses a
# strided view that gemm multiplies as it is, and the bf16 products run in MKL's bf16 GEMM), so
# the build the benchmarks call the fastest is tested too. MKL comes from PyPI
# (scripts/setup_mkl.sh); the real test models from scripts/fetch_models.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup_mkl.sh)"
export MKLROOT CARGO_TARGET_DIR=target/mkl
cargo test --release --features mkl --lib --tests
