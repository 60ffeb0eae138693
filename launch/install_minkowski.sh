#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (PyPI's sdist) for the `minkowski`
# backend, against the PyTorch already installed in this Python.
#
#   bash launch/install_minkowski.sh cpu     # CPU-only build (no CUDA needed)
#   bash launch/install_minkowski.sh cuda    # CUDA build (needs nvcc matching torch.version.cuda)
#
# MinkowskiEngine is optional: the project installs and passes its tests
# without it. What this script does (docs/MINKOWSKI.md explains each step):
#   1. checks Python and PyTorch; for `cuda`, nvcc and CUDA_HOME;
#   2. installs OpenBLAS headers (Debian/Ubuntu: libopenblas-dev) if missing;
#   3. fetches the sdist with pip (or uses ME_SDIST=/path/to/MinkowskiEngine-0.5.4.tar.gz);
#   4. applies launch/patches/minkowski_0.5.4.py (setup.py fixes; CUDA >= 12 includes);
#   5. builds a wheel with setup.py (--cpu_only or --force_cuda, --blas=openblas)
#      and installs it with pip; 6. imports it and runs a tiny convolution.
#
# Environment:
#   PYTHON      the Python to build for (default: python)
#   ME_WORKDIR  scratch directory (default: /tmp/minkowski-build); removed first
#   ME_SDIST    a local MinkowskiEngine-0.5.4.tar.gz instead of downloading one
#   MAX_JOBS    parallel compile jobs (default: 2). Each job needs ~2-3 GB RAM.
#   NICE        niceness of the compile (default: 10)
#   BLAS_INCLUDE_DIR  directory with cblas.h (default: found under /usr/include)
#   CUDA_HOME, TORCH_CUDA_ARCH_LIST   for `cuda` (arch list default: this machine's GPU)
#   ME_WHEEL_ONLY=1   build the wheel ($ME_WORKDIR/MinkowskiEngine-0.5.4/dist) but do not install it
set -euo pipefail

VARIANT="${1:-}"
if [[ "$VARIANT" != "cpu" && "$VARIANT" != "cuda" ]]; then
    echo "usage: bash launch/install_minkowski.sh cpu|cuda" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORKDIR="${ME_WORKDIR:-/tmp/minkowski-build}"
export MAX_JOBS="${MAX_JOBS:-2}"
NICE="${NICE:-10}"
ME_VERSION=0.5.4

say() { echo "[install_minkowski] $*"; }
die() { echo "[install_minkowski] ERROR: $*" >&2; exit 1; }

# 1. Python and PyTorch ---------------------------------------------------------
"$PYTHON" -c "import torch" 2>/dev/null || die "PyTorch is not importable with $PYTHON; install torch first"
# The interpreter itself, not a wrapper such as a pyenv shim (which puts its own
# bin directory, with the real pip, first on PATH: see the download step).
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"
TORCH_INFO="$("$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)')"
say "python, torch, torch's CUDA: $TORCH_INFO"
if [[ "$VARIANT" == "cuda" ]]; then
    TORCH_CUDA="$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')"
    [[ -n "$TORCH_CUDA" ]] || die "this torch is a CPU-only build; install a CUDA build of torch or use 'cpu'"
    CUDA_HOME="${CUDA_HOME:-$("$PYTHON" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)}"
    [[ -n "$CUDA_HOME" && -x "$CUDA_HOME/bin/nvcc" ]] || die "nvcc not found: set CUDA_HOME to a CUDA toolkit (with bin/nvcc) matching torch's CUDA $TORCH_CUDA"
    NVCC_VERSION="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
    say "nvcc $NVCC_VERSION at $CUDA_HOME (torch built with CUDA $TORCH_CUDA)"
    [[ "${NVCC_VERSION%%.*}" == "${TORCH_CUDA%%.*}" ]] || die "nvcc $NVCC_VERSION and torch's CUDA $TORCH_CUDA differ in major version"
    [[ -f "$CUDA_HOME/include/cuda_runtime.h" ]] || die "$CUDA_HOME/include/cuda_runtime.h not found (nvcc may be a wrapper): set CUDA_HOME to the toolkit directory, e.g. /usr/local/cuda-13.0"
    export CUDA_HOME
    # CUDA >= 13 keeps thrust/cub under include/cccl; ME's plain .cpp files include thrust too.
    if [[ -d "$CUDA_HOME/include/cccl" ]]; then
        export CPATH="$CUDA_HOME/include/cccl${CPATH:+:$CPATH}"
    fi
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
        TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f"{c[0]}.{c[1]}" if c else "")')"
        [[ -n "$TORCH_CUDA_ARCH_LIST" ]] || die "no GPU visible: set TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0\") for the GPUs you will run on"
    fi
    export TORCH_CUDA_ARCH_LIST
    say "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
fi

# 2. OpenBLAS headers -------------------------------------------------------------
find_cblas() {
    local d
    for d in "${BLAS_INCLUDE_DIR:-}" /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/aarch64-linux-gnu/openblas-pthread \
             /usr/include/openblas /usr/include/x86_64-linux-gnu /usr/include "${CONDA_PREFIX:-/nonexistent}/include"; do
        if [[ -n "$d" && -f "$d/cblas.h" ]]; then echo "$d"; return 0; fi
    done
    return 1
}
if ! BLAS_DIR="$(find_cblas)"; then
    if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
        say "installing libopenblas-dev (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev
        BLAS_DIR="$(find_cblas)" || die "libopenblas-dev installed but cblas.h not found; set BLAS_INCLUDE_DIR"
    else
        die "OpenBLAS headers (cblas.h) not found: install libopenblas-dev (Debian/Ubuntu) or openblas (conda), or set BLAS_INCLUDE_DIR"
    fi
fi
say "OpenBLAS headers: $BLAS_DIR"

# 3. The sdist ---------------------------------------------------------------------
rm -rf "$WORKDIR"
mkdir -p "$WORKDIR"
if [[ -n "${ME_SDIST:-}" ]]; then
    [[ -f "$ME_SDIST" ]] || die "ME_SDIST=$ME_SDIST is not a file"
    cp "$ME_SDIST" "$WORKDIR/"
else
    say "downloading MinkowskiEngine==$ME_VERSION (sdist) from PyPI"
    # pip prepares the sdist's metadata by running its (unpatched) setup.py,
    # which imports torch (hence --no-build-isolation), looks for BLAS through
    # numpy.distutils (hence SETUPTOOLS_USE_DISTUTILS=stdlib; Python <= 3.11)
    # and runs `pip uninstall MinkowskiEngine -y`, which would remove an
    # installed ME: a no-op `pip` first on PATH absorbs that call.
    mkdir -p "$WORKDIR/noop-bin"
    printf '#!/bin/sh\necho "(install_minkowski: ignored setup.py call: pip $*)"\n' > "$WORKDIR/noop-bin/pip"
    chmod +x "$WORKDIR/noop-bin/pip"
    PATH="$WORKDIR/noop-bin:$PATH" SETUPTOOLS_USE_DISTUTILS=stdlib "$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation \
        "MinkowskiEngine==$ME_VERSION" -d "$WORKDIR" > "$WORKDIR/download.log" 2>&1 \
        || { tail -20 "$WORKDIR/download.log" >&2
             die "pip download failed (log: $WORKDIR/download.log). On Python >= 3.12 download MinkowskiEngine-$ME_VERSION.tar.gz from https://pypi.org/project/MinkowskiEngine/$ME_VERSION/#files and set ME_SDIST"; }
fi
tar -xzf "$WORKDIR/MinkowskiEngine-$ME_VERSION.tar.gz" -C "$WORKDIR"
SRC="$WORKDIR/MinkowskiEngine-$ME_VERSION"

# 4. Patches -----------------------------------------------------------------------
PATCH_ARGS=()
[[ "$VARIANT" == "cuda" ]] && PATCH_ARGS+=(--cuda)
"$PYTHON" "$REPO/launch/patches/minkowski_$ME_VERSION.py" "$SRC" "${PATCH_ARGS[@]}"

# 5. Build a wheel and install it --------------------------------------------------------
BUILD_ARGS=(--blas=openblas "--blas_include_dirs=$BLAS_DIR")
if [[ "$VARIANT" == "cpu" ]]; then
    BUILD_ARGS+=(--cpu_only)
else
    BUILD_ARGS+=(--force_cuda "--cuda_home=$CUDA_HOME")
    # A minimal toolkit (nvcc only) lacks cuSPARSE/cuBLAS/cuRAND headers; torch's
    # pip wheels ship them (site-packages/nvidia/...): use those, and link
    # against the same libraries torch loads.
    if [[ ! -f "$CUDA_HOME/include/cusparse.h" ]]; then
        NV_INC="$("$PYTHON" -c 'import glob, os, torch; sp = os.path.dirname(os.path.dirname(torch.__file__)); print(next(iter(sorted(glob.glob(sp + "/nvidia/*/include/cusparse.h"))), "").rpartition("/")[0])')"
        [[ -n "$NV_INC" ]] || die "cusparse.h is neither in $CUDA_HOME/include nor in torch's nvidia pip packages: install the CUDA toolkit's math libraries"
        mkdir -p "$WORKDIR/cuda-libs"
        for lib in cusparse cublas curand cudart; do
            so="$(ls "${NV_INC%/include}"/lib/lib$lib.so.* 2>/dev/null | head -1)"
            [[ -n "$so" ]] && ln -sf "$so" "$WORKDIR/cuda-libs/lib$lib.so"
        done
        export CPATH="$NV_INC${CPATH:+:$CPATH}"
        export LIBRARY_PATH="$WORKDIR/cuda-libs${LIBRARY_PATH:+:$LIBRARY_PATH}"
        say "CUDA math library headers from torch's pip packages: $NV_INC"
    fi
fi
say "building ($VARIANT, MAX_JOBS=$MAX_JOBS, nice $NICE); log: $WORKDIR/build.log"
START=$(date +%s)
( cd "$SRC" && nice -n "$NICE" "$PYTHON" setup.py bdist_wheel "${BUILD_ARGS[@]}" ) > "$WORKDIR/build.log" 2>&1 \
    || { grep -E "error|Error" "$WORKDIR/build.log" | head -30 >&2; die "build failed (log: $WORKDIR/build.log)"; }
say "built in $(( $(date +%s) - START )) s"
# setuptools >= 69 lower-cases the wheel's name (minkowskiengine-0.5.4-...).
WHEEL="$(ls "$SRC"/dist/*.whl)"
[[ "$(echo "$WHEEL" | wc -l)" == 1 ]] || die "expected one wheel in $SRC/dist, found: $WHEEL"
if [[ "${ME_WHEEL_ONLY:-0}" == 1 ]]; then
    say "ME_WHEEL_ONLY=1: built $WHEEL; not installing it"
    exit 0
fi
"$PYTHON" -m pip install --no-deps --force-reinstall "$WHEEL"

# 6. Smoke test ------------------------------------------------------------------------------
cd "$WORKDIR"  # not the source tree, so the installed package is imported
"$PYTHON" - <<'EOF'
import warnings
import torch
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import MinkowskiEngine as ME
coords = torch.IntTensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
x = ME.SparseTensor(torch.ones(4, 2), coordinates=coords)
conv = ME.MinkowskiConvolution(2, 3, kernel_size=3, dimension=2)
y = conv(x)
assert y.F.shape == (4, 3)
print(f"[install_minkowski] MinkowskiEngine {ME.__version__} works (CUDA: {ME.is_cuda_available()})")
EOF
say "done. Run the backend's tests with: bash launch/test_minkowski.sh"
