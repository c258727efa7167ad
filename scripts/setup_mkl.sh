#!/usr/bin/env bash
# Lays out Intel MKL for `cargo build --features mkl` from PyPI's wheels (mkl-static,
# mkl-include, intel-openmp), so that the build needs no download of its own:
#
#   eval "$(scripts/setup_mkl.sh)"        # prints `export MKLROOT=...`
#   cargo build --release --features mkl
#
# candle's `mkl` feature links MKL statically through the intel-mkl-src crate, which finds the
# libraries under $MKLROOT (and would otherwise try to download them from ghcr.io at build
# time). The layout holds only what that link uses: the LP64 interface, the Intel OpenMP
# threading layer and the core (static), libiomp5.a (static, so the binary needs no library
# path at run time) and the headers. Idempotent: a finished layout is reused.
#
# Env: MKL_DIR (default ~/.cache/candle-peft/mkl), PYTHON (default python3), MKL_VERSION.
set -euo pipefail

version="${MKL_VERSION:-2026.2.0}"
dir="${MKL_DIR:-$HOME/.cache/candle-peft/mkl}"
python="${PYTHON:-python3}"
root="$dir/$version"

if [[ ! -f "$root/.done" ]]; then
    echo "setting up MKL $version from PyPI in $root" >&2
    tmp="$(mktemp -d "$dir.XXXXXX" 2>/dev/null || { mkdir -p "$(dirname "$dir")"; mktemp -d "$dir.XXXXXX"; })"
    trap 'rm -rf "$tmp"' EXIT
    "$python" -m pip download --quiet --no-deps --dest "$tmp/wheels" \
        "mkl-static==$version" "mkl-include==$version" "intel-openmp==$version" >&2
    "$python" - "$tmp" <<'EOF'
import pathlib, shutil, sys, zipfile

tmp = pathlib.Path(sys.argv[1])
lib, include = tmp / "layout/lib", tmp / "layout/include"
lib.mkdir(parents=True)
include.mkdir(parents=True)
wanted = {"libmkl_intel_lp64.a", "libmkl_intel_thread.a", "libmkl_core.a", "libiomp5.a"}
for wheel in sorted((tmp / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            path = pathlib.PurePosixPath(name)
            if path.name in wanted and "/lib/" in name:
                dest = lib / path.name
            elif "/include/" in name and not name.endswith("/"):
                dest = include / pathlib.PurePosixPath(name.split("/include/", 1)[1])
            else:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
missing = wanted - {p.name for p in lib.iterdir()}
if missing or not (include / "mkl.h").exists():
    sys.exit(f"the MKL wheels lack {sorted(missing) or 'mkl.h'}")
EOF
    mkdir -p "$dir"
    rm -rf "$root"
    mv "$tmp/layout" "$root"
    touch "$root/.done"
fi
echo "export MKLROOT=$root"
