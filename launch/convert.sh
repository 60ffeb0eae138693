#!/usr/bin/env bash
# Sparse (FCMAE) checkpoint -> dense ConvNeXt V2 weights. One process; no GPU needed.
#
#   launch/convert.sh IN OUT [--format timm|reference] [--size SIZE] [--verify | --no-verify]
#
#   launch/convert.sh output/pretrain/atto_demo/checkpoint-last.pth atto_dense.pth
#   launch/convert.sh convnextv2_base_1k_224_fcmae.pt base_dense.pth --size base    # reference release's file
#   launch/convert.sh fcmae_base.pth base_reference.pth --format reference          # for the reference code
#
# IN may be this project's FCMAE checkpoint or encoder state dict, or the
# reference release's FCMAE checkpoint (MinkowskiEngine layout); the format
# is detected. See finetune/convert.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Run from anywhere: relative paths stay relative to the caller's directory.
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m finetune.convert "$@"
