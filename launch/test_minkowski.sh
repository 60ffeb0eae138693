#!/usr/bin/env bash
# Run the `minkowski` backend's tests, building MinkowskiEngine first if needed.
#
#   bash launch/test_minkowski.sh            # build (CPU) if ME is missing, then test
#   bash launch/test_minkowski.sh --rebuild  # always rebuild with launch/install_minkowski.sh
#   bash launch/test_minkowski.sh --bench    # also run the encoder benchmark with every backend
#   VARIANT=cuda bash launch/test_minkowski.sh
#
# The default CI does not build MinkowskiEngine (a CPU build takes 10-40 min);
# there tests/sparse/test_minkowski.py is skipped with its reason and
# tests/sparse/test_minkowski_missing.py checks the error users get without it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
VARIANT="${VARIANT:-cpu}"
REBUILD=0
BENCH=0
for arg in "$@"; do
    case "$arg" in
        --rebuild) REBUILD=1 ;;
        --bench) BENCH=1 ;;
        *) echo "usage: bash launch/test_minkowski.sh [--rebuild] [--bench]" >&2; exit 2 ;;
    esac
done

cd "$REPO"
if [[ "$REBUILD" == 1 ]] || ! "$PYTHON" -c "import MinkowskiEngine" >/dev/null 2>&1; then
    bash launch/install_minkowski.sh "$VARIANT"
fi
"$PYTHON" -c "import warnings; warnings.simplefilter('ignore'); import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'CUDA:', ME.is_cuda_available())"
"$PYTHON" -m pytest -v -ra -W ignore::UserWarning tests/sparse/test_minkowski.py tests/sparse/test_minkowski_missing.py
if [[ "$BENCH" == 1 ]]; then
    "$PYTHON" -m fcmae.tools.bench_encoder --size atto --batch 8 --img-size 224 --mask-ratio 0.6 --threads 2
fi
