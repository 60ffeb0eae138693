#!/usr/bin/env bash
# FCMAE pre-training launcher.
#
#   launch/pretrain.sh SIZE SCHEDULE [--key value ...]
#
#   launch/pretrain.sh atto demo                                  # CPU demo, built-in photographs
#   launch/pretrain.sh huge 800ep --data_path /path/to/imagenet   # all GPUs of this node
#   launch/pretrain.sh huge 800ep --data_path /path/to/imagenet --dry_run   # print the plan only
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/pretrain.sh base 1600ep --data_path ...  # per node
#   sbatch --nodes 8 --ntasks-per-node 8 --gpus-per-node 8 --wrap "launch/pretrain.sh base 1600ep --data_path ..."
#
# SIZE: atto femto pico nano tiny base large huge.  SCHEDULE: 800ep 1600ep demo.
# The per-GPU batch and gradient accumulation are fitted so that the effective
# batch is the schedule's (4096 for 800ep/1600ep) on any number of GPUs that
# divides it; the plan says when the per-GPU batch was lowered. Any config key can be
# overridden (--batch_size 32, --output_dir DIR, ...); see configs/pretrain/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

fcmae_usage "launch/pretrain.sh SIZE SCHEDULE [--key value ...]" \
    "launch/pretrain.sh atto demo    or    launch/pretrain.sh huge 800ep --data_path /path/to/imagenet" "$@"
# Run from anywhere: relative paths stay relative to the caller's directory.
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
fcmae_launch fcmae.pretrain.main "$@"
