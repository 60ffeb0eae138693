# Shared launcher logic; source it, then call:  fcmae_launch PYTHON_MODULE [args...]
#
# Everything is decided in Python, by `python -m fcmae.runtime.launch` (see
# fcmae/runtime/launch/launcher.py), with the command's own flag parser, so the shell and
# the command cannot disagree:
#   - processes per node: $NPROC_PER_NODE, else the GPUs torch.cuda.device_count()
#     sees (honouring CUDA_VISIBLE_DEVICES), else 1 CPU process;
#   - nodes: $NNODES (default 1; inside a SLURM allocation $SLURM_JOB_NUM_NODES),
#     with $NODE_RANK, $MASTER_ADDR, $MASTER_PORT for multi-node torchrun;
#   - launcher: $FCMAE_LAUNCHER (python | torchrun | srun), else srun inside a
#     SLURM allocation, torchrun for several processes, plain python for one;
#   - the plan is printed (and bad input stops) before several processes start;
#     with --dry_run (any form the command accepts) nothing is started.
# $PYTHON picks the interpreter (default: python).
# The launcher replaces the shell (exec), so that a signal to the shell reaches
# it: it passes stop signals on to every training process and waits for them.

# fcmae_usage USAGE EXAMPLE "$@": stop with the usage unless the first two arguments are positionals.
fcmae_usage() {
    local usage="$1" example="$2"
    shift 2
    if (( $# < 2 )) || [[ "$1" == -* || "$2" == -* ]]; then
        echo "usage: $usage" >&2
        echo "  e.g. $example" >&2
        exit 2
    fi
}

fcmae_launch() {
    exec "${PYTHON:-python}" -m fcmae.runtime.launch "$@"
}
