"""The training runtime both commands share; it imports neither command.

    files       write_atomic: the one atomic file write; full disks; temporaries of killed writes
    lock        one run per output folder (a lock file, stale after a crash)
    resume_check  which changed settings stop a resume; carrying the position over to a new plan
    config      YAML layers, command-line overrides, the reference release's flag forms
    settings    typed, frozen run configs: TrainConfig, setting(), build_config()
    plan        Plan, make_plan(): per-GPU batch, accumulation, effective batch, lr, steps
    checkpoint  save/load (weights_only), keep-newest-N, auto-resume, RNG state
    distributed process group set-up from torchrun's or SLURM's variables
    signals     SIGTERM / SIGUSR1 requests to stop; loader workers ignore them
    slurm       what is read from SLURM (tasks per node, rank variables), self-requeue
    logs        progress lines, log.jsonl, TensorBoard
    schedule    warmup + cosine lr per optimizer step
    trainer     Trainer (the epoch loop), RunState, LoopSettings
    loader      the training loader (resumable shard order, workers ignore stop signals), seeds
    device      CUDA defaults (TF32, cudnn.benchmark, fused AdamW), torch.compile, autocast and loss scaler
    command     Command (command line -> config -> dry run or run; errors -> exit codes)
    launch      `python -m fcmae.runtime.launch MODULE ...`: world size, launcher, dry run, signals passed on
    detach      runs srun outside the batch shell's process tree (for `scancel --full`)
"""
