"""The training runtime both commands share; it imports nothing else of the project.

    errors      every runtime exception, each with its exit code
    command     run_cli (one line and an exit code for expected errors), TrainSpec (what a command declares)
    config      YAML layers, command-line overrides, the reference release's flag forms
    settings    typed, frozen run configs: TrainConfig, setting(), build_config()
    plan        Plan, make_plan(): per-GPU batch, accumulation, effective batch, lr, steps; the lr schedule
    batch_fit   batch_fit auto: the largest per-GPU batch that fits the GPU (a measured memory line, a trial)
    resume      which checkpoint to resume, whether it fits, which changed settings stop a resume
    checkpoint  save/load (weights_only), keep-newest-N, auto-resume, RNG state
    files       write_atomic: the one atomic file write; full disks; temporaries of killed writes
    lock        one run per output folder (a flock, free as soon as its holder dies)
    output_folder  a start stopped by bad input removes the output folders it made (nothing to keep in them)
    distributed process group set-up from torchrun's or SLURM's variables; collectives
    device      CUDA defaults (TF32, cudnn.benchmark, fused AdamW), torch.compile, autocast, the run's process
    signals     SIGTERM / SIGUSR1 requests to stop; loader workers ignore them
    lifeline    processes that end with the one that started them (no orphaned rank or loader worker)
    logs        progress lines, log.jsonl, TensorBoard
    report      the end-of-run summary and curves.png, from log.jsonl (`python -m fcmae.runtime.report DIR`)
    loader      the training loader (resumable shard order, workers ignore stop signals), seeds
    stepping    StopAgreement (when every rank stops; loss checks), AccumulationWindow (rollback to a step)
    trainer     Trainer (the epoch loop), RunState, LoopSettings
    timed_saves timed mid-epoch checkpoints (save_minutes), written in the background
    watchdog    the hang watchdog (hang_minutes): stacks to the output folder, exit 6
    launch/     starting processes: `python -m fcmae.runtime.launch MODULE ...` (launcher), torchrun with
                one-line failures naming the rank that failed first, restarts (max_restarts), SLURM
                (slurm, detach)
"""
