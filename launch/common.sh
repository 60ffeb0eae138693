# Shared launcher logic; source it, then call:  fcmae_launch PYTHON_MODULE [args...]
#
# Decides how many processes to start and how:
#   - GPUs per node: $NPROC_PER_NODE, else the GPUs nvidia-smi lists (honouring
#     CUDA_VISIBLE_DEVICES), else 1 CPU process.
#   - Nodes: $NNODES (default 1; under SLURM, $SLURM_JOB_NUM_NODES), with
#     $NODE_RANK, $MASTER_ADDR, $MASTER_PORT for multi-node torchrun.
#   - Inside a SLURM allocation (sbatch/salloc, not already inside srun):
#     srun, one task per GPU, MASTER_ADDR = first host of the allocation.
#     Otherwise torchrun (one node: --standalone; several: static rendezvous).
#     One CPU process on one node runs plain python.
#   - $FCMAE_LAUNCHER = python | torchrun | srun forces a choice.
#
# Before starting several processes it runs the module once with --dry_run,
# which validates the settings and prints the plan (world size, per-GPU batch,
# accumulation, effective batch, lr, epochs); bad input stops there with a
# clear message. With --dry_run among the arguments it stops after that.
#
# Contract for MODULE: it accepts `--world_size N` (the planned number of
# processes) and `--dry_run` (print the plan, train nothing; when the
# environment has FCMAE_PREFLIGHT=1 the real run follows), and exits non-zero
# with a message on bad input.

fcmae_count_gpus() {
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        echo "$NPROC_PER_NODE"
        return
    fi
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
            if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
                n=0
            else
                local visible
                visible=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
                (( visible < n )) && n=$visible
            fi
        fi
    fi
    echo "${n:-0}"
}

fcmae_launch() {
    local module="$1"
    shift
    local python="${PYTHON:-python}"
    local gpus nproc nnodes world launcher
    gpus=$(fcmae_count_gpus)
    nproc=$(( gpus > 0 ? gpus : 1 ))
    if [[ -n "${SLURM_JOB_ID:-}" && -z "${NNODES:-}" ]]; then
        nnodes="${SLURM_JOB_NUM_NODES:-1}"
    else
        nnodes="${NNODES:-1}"
    fi
    world=$(( nnodes * nproc ))

    launcher="${FCMAE_LAUNCHER:-}"
    if [[ -z "$launcher" ]]; then
        if [[ -n "${SLURM_JOB_ID:-}" && -z "${SLURM_STEP_ID:-}" ]] && command -v srun >/dev/null 2>&1; then
            launcher=srun
        elif (( world > 1 )); then
            launcher=torchrun
        else
            launcher=python
        fi
    fi

    # --dry_run, --dry_run true/1/yes or --dry_run=true; `--dry_run false` is a real run.
    local dry=0 args=("$@") i next
    for (( i = 0; i < ${#args[@]}; i++ )); do
        case "${args[i],,}" in
            --dry_run=true|--dry-run=true|--dry_run=1|--dry-run=1) dry=1 ;;
            --dry_run|--dry-run)
                next="${args[i + 1]:-}"
                case "${next,,}" in
                    false|0|no) ;;
                    *) dry=1 ;;
                esac
                ;;
        esac
    done

    echo "launch: ${launcher}, ${nnodes} node(s) x ${nproc} process(es) = world size ${world}" \
         "($( (( gpus > 0 )) && echo "${gpus} GPU(s) per node" || echo "CPU"))"
    # Validate and print the plan in one quick process before starting many;
    # bad input stops here. (A single python process does both itself.)
    if (( dry )) || [[ "$launcher" != python ]]; then
        FCMAE_PREFLIGHT=$(( 1 - dry )) "$python" -m "$module" "$@" --world_size "$world" --dry_run || return $?
        (( dry )) && return 0
    fi

    case "$launcher" in
        python)
            "$python" -m "$module" "$@" --world_size "$world"
            ;;
        torchrun)
            if (( nnodes > 1 )); then
                : "${MASTER_ADDR:?multi-node runs need MASTER_ADDR (the address of the node with NODE_RANK=0)}"
                : "${NODE_RANK:?multi-node runs need NODE_RANK (0 .. NNODES-1) on each node}"
                torchrun --nnodes "$nnodes" --node_rank "$NODE_RANK" --nproc_per_node "$nproc" \
                    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
                    -m "$module" "$@" --world_size "$world"
            else
                torchrun --standalone --nnodes 1 --nproc_per_node "$nproc" -m "$module" "$@" --world_size "$world"
            fi
            ;;
        srun)
            if [[ -z "${MASTER_ADDR:-}" ]]; then
                MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
            fi
            export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}"
            # SLURM sends SIGTERM (or --signal=USR1@...) before pre-emption; the
            # training saves a checkpoint at the next step and exits cleanly.
            srun --nodes "$nnodes" --ntasks-per-node "$nproc" --kill-on-bad-exit=1 \
                "$python" -u -m "$module" "$@" --world_size "$world"
            ;;
        *)
            echo "launch: unknown FCMAE_LAUNCHER '$launcher' (python, torchrun or srun)" >&2
            return 2
            ;;
    esac
}
