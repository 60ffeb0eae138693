#!/usr/bin/env bash
# Fine-tuning launcher (also evaluation with --eval).
#
#   launch/finetune.sh SIZE CHECKPOINT [--key value ...]
#
#   launch/finetune.sh atto output/pretrain/atto_demo/checkpoint-last.pth --demo     # CPU demo
#   launch/finetune.sh atto none --demo                                               # demo from scratch
#   launch/finetune.sh base fcmae_base.pth --data_path /path/to/imagenet               # all GPUs of this node
#   launch/finetune.sh base fcmae_base.pth --data_path /path/to/imagenet --dry_run     # print the plan only
#   launch/finetune.sh base none --eval --resume output/finetune/base/checkpoint-last.pth --data_path ...
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/finetune.sh huge fcmae_huge.pth --data_path ...  # per node
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 --wrap "launch/finetune.sh large fcmae_large.pth --data_path ..."
#
# SIZE: atto femto pico nano tiny base large huge. CHECKPOINT: an FCMAE
# checkpoint (this project's or the reference release's; converted on the
# fly), a file written by launch/convert.sh, or `none` (from scratch).
# The recipe is configs/finetune/sizes/SIZE.yaml; the per-GPU batch and gradient
# accumulation are fitted so that its effective batch (1024) holds on any number
# of GPUs that divides it. Any config key can
# be overridden (--batch_size 32, --output_dir DIR, ...), and the reference
# release's flags work too (--layer_decay 0.9, --model_ema true, ...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

fcmae_usage "launch/finetune.sh SIZE CHECKPOINT [--key value ...]   (CHECKPOINT may be 'none')" \
    "launch/finetune.sh atto output/pretrain/atto_demo/checkpoint-last.pth --demo" "$@"
# Run from anywhere: relative paths stay relative to the caller's directory.
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
fcmae_launch finetune.main_finetune "$@"
