#!/usr/bin/env bash
# The GPU check: CUDA tests, benchmark table and a short pre-training run, in one command.
#
#   bash launch/gpu_check.sh --preset speed                    # the prepared GPU command: rows by value, 7 minutes
#   bash launch/gpu_check.sh                                   # on the GPU, results in output/gpu_check
#   bash launch/gpu_check.sh --sizes base --parts tests,bench  # a subset, to fit a time budget
#   bash launch/gpu_check.sh --device cpu --quick --out /tmp/check   # tiny configs on CPU (CI)
#
# Writes OUT/gpu_check.json and OUT/gpu_check.md (updated after every part and
# bench row; rows the time budget, --budget-min, leaves out are listed with the
# reason). Flags: python -m fcmae.tools.gpu_check --help.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
# $PYTHON picks the interpreter (default: python, else python3); the parts' subprocesses use the same one.
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    command -v python >/dev/null 2>&1 || PYTHON=python3
fi
exec "$PYTHON" -m fcmae.tools.gpu_check "$@"
