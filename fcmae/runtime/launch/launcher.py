"""Start a training command on this machine's GPUs: `python -m fcmae.runtime.launch MODULE [args...]`.

launch/pretrain.sh and launch/finetune.sh call this; it decides everything
they used to decide in bash, with the command's own flag parser:

1. the world: processes per node (`NPROC_PER_NODE`, else the GPUs that
   `torch.cuda.device_count()` sees, honouring CUDA_VISIBLE_DEVICES, else 1 CPU process)
   x nodes (`NNODES`). Inside a SLURM allocation (sbatch/salloc) the
   allocation decides: nodes `SLURM_JOB_NUM_NODES`, tasks per node
   `SLURM_NTASKS_PER_NODE` (else `SLURM_TASKS_PER_NODE`), GPUs
   `SLURM_GPUS_ON_NODE`; an `NPROC_PER_NODE` that disagrees is an error.
   Run as one task of an srun step, the world is the step's;
2. the launcher: `FCMAE_LAUNCHER` (python | torchrun | srun) if set
   (python: one process, whatever the scheduler says); else srun inside a
   SLURM allocation, torchrun for several processes, plain python for one;
3. the config, resolved by MODULE's `SPEC.resolve` with `--world_size`:
   bad input stops here with one line and exit code 2;
4. with `--dry_run` (as MODULE reads it: `--dry_run`, `--dry_run=yes`,
   `--dry_run true` ...), the plan is printed and nothing is started;
5. otherwise plain python replaces this process (exec), so every signal
   reaches the training directly; torchrun and srun run as a child that
   `Supervisor` passes the stop signals on to, and this process exits with
   the child's code. With `max_restarts` > 0 the training (one process too)
   runs as a child, started again after failures a restart can mend
   (fcmae.runtime.launch.restarts).

`world_from_environment` is the one place that reads the world from the
environment; a scheduler's variables belong there.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

from fcmae.runtime.errors import LaunchError
from fcmae.runtime.launch import slurm
from fcmae.runtime.lifeline import PARENT_VARIABLE, die_with_parent
from fcmae.runtime.signals import INTERRUPTED_EXIT_CODE

LAUNCHERS = ("python", "torchrun", "srun")


@dataclass(frozen=True)
class World:
    """Where the processes run."""

    launcher: str  # python | torchrun | srun
    nnodes: int
    nproc_per_node: int
    gpus_per_node: int  # 0: CPU

    @property
    def size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def describe(self) -> str:
        device = f"{self.gpus_per_node} GPU(s) per node" if self.gpus_per_node else "CPU"
        return (f"launch: {self.launcher}, {self.nnodes} node(s) x {self.nproc_per_node} process(es) = "
                f"world size {self.size} ({device})")


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    if not value.isdigit() or int(value) < 1:
        raise LaunchError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def count_gpus() -> int:
    """GPUs this process sees: `torch.cuda.device_count()` (this process's CUDA_VISIBLE_DEVICES; 0 without CUDA).

    torch counts them with NVML, which creates no CUDA context; where NVML cannot (MIG devices, no
    libnvidia-ml) it asks the CUDA runtime, which initialises the driver in this process. Either is safe
    here: the launcher itself never uses CUDA and starts the training by exec (python) or as a new program
    (torchrun, srun), never by a fork that would inherit the driver's state.
    """
    import torch  # the launcher imports torch only here, after its stop handler is in place

    return torch.cuda.device_count()


def _slurm_world(env: Mapping[str, str], launcher: str) -> World:
    """The world of a SLURM allocation: nodes, tasks per node and GPUs per node from SLURM's variables.

    An explicit NPROC_PER_NODE must agree with the allocation's tasks per node.
    """
    nnodes = _positive_int(env, "NNODES", 0) or _positive_int(env, "SLURM_JOB_NUM_NODES", 1)
    try:
        tasks = slurm.tasks_per_node(env)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    explicit = _positive_int(env, "NPROC_PER_NODE", 0)
    if tasks is not None and explicit and explicit != tasks:
        where = "SLURM_NTASKS_PER_NODE" if env.get("SLURM_NTASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
        raise LaunchError(f"NPROC_PER_NODE={explicit} disagrees with the SLURM allocation's {tasks} task(s) per node "
                          f"({where}); unset NPROC_PER_NODE or ask sbatch for --ntasks-per-node={explicit}")
    nproc = tasks or explicit or 1
    return World(launcher, nnodes, nproc, min(_gpus_on_node(env), nproc))


def _gpus_on_node(env: Mapping[str, str]) -> int:
    """SLURM_GPUS_ON_NODE inside an allocation that has GPUs (gres), else the GPUs this node shows."""
    value = env.get("SLURM_GPUS_ON_NODE", "")
    if value.isdigit():
        return int(value)
    return count_gpus()


def world_from_environment(env: Optional[Mapping[str, str]] = None) -> World:
    """The launcher and the number of nodes and processes, from the environment (see the module docstring).

    `env` holds the launcher's and the scheduler's variables; the GPU count is this process's
    (`count_gpus`: torch reads CUDA_VISIBLE_DEVICES from the real environment, not from `env`).
    """
    env = os.environ if env is None else env
    launcher = env.get("FCMAE_LAUNCHER", "")
    if launcher and launcher not in LAUNCHERS:
        raise LaunchError(f"unknown FCMAE_LAUNCHER {launcher!r} ({', '.join(LAUNCHERS)})")
    if launcher == "python":  # one process, whatever the scheduler's variables say
        return World("python", 1, 1, min(count_gpus(), 1))
    if slurm.in_step(env) and not launcher:  # already one task of an srun step: its world is the step's
        try:
            per_node = slurm.parse_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or "1")
        except ValueError as e:
            raise LaunchError(str(e)) from None
        return World("python", _positive_int(env, "SLURM_STEP_NUM_NODES", 1), per_node,
                     min(_gpus_on_node(env), per_node))
    if slurm.in_allocation(env) and not slurm.in_step(env):
        if not launcher:
            launcher = "srun" if shutil.which("srun") else "torchrun"
        return _slurm_world(env, launcher)
    if launcher == "srun":
        return _slurm_world(env, launcher)
    gpus = count_gpus()
    nproc = _positive_int(env, "NPROC_PER_NODE", 0) or max(gpus, 1)
    nnodes = _positive_int(env, "NNODES", 1)
    return World(launcher or ("torchrun" if nnodes * nproc > 1 else "python"), nnodes, nproc, min(gpus, nproc))


def launch_argv(world: World, module: str, args: Sequence[str], env: Mapping[str, str]) -> List[str]:
    """The command line that starts `module` on every process of `world`."""
    python = sys.executable
    script = ["-m", module, *args, "--world_size", str(world.size)]
    if world.launcher == "python":
        return [python, *script]
    if world.launcher == "torchrun":
        run = [python, "-m", "fcmae.runtime.launch.torchrun"]  # torchrun, one line instead of its traceback on failure
        if world.nnodes == 1:
            return [*run, "--standalone", "--nnodes", "1", "--nproc_per_node", str(world.nproc_per_node), *script]
        for name, what in (("MASTER_ADDR", "the address of the node with NODE_RANK=0"),
                           ("NODE_RANK", "0 .. NNODES-1 on each node")):
            if not env.get(name):
                raise LaunchError(f"multi-node runs need {name} ({what})")
        return [*run, "--nnodes", str(world.nnodes), "--node_rank", env["NODE_RANK"], "--nproc_per_node",
                str(world.nproc_per_node), "--master_addr", env["MASTER_ADDR"], "--master_port",
                env.get("MASTER_PORT", "29500"), *script]
    # srun: one task per GPU (per CPU process); see Supervisor for the signals.
    return ["srun", "--nodes", str(world.nnodes), "--ntasks-per-node", str(world.nproc_per_node),
            "--kill-on-bad-exit=1", "--unbuffered", python, "-u", *script]


class Supervisor:
    """Runs torchrun or srun as a child and passes the stop signals it receives on to every training process.

    Installed before anything slow, it records SIGTERM, SIGINT, SIGUSR1 and
    SIGHUP from the start. Once the child runs, each of them is passed on:
    - srun: SIGUSR1 to srun, which forwards it to every task of its step on
      every node. srun turns a SIGTERM of its own into a SIGKILL of the step
      (`scancel --signal=TERM --full` sends one), so srun is started outside
      this process's tree and session (fcmae.runtime.launch.detach), where
      SLURM's proctrack/linuxproc does not signal it (docs/fault-tolerance-and-slurm.md);
    - torchrun: the signal (SIGTERM for SIGHUP) to each training process,
      which torchrun starts in sessions of their own. torchrun itself ignores
      these signals: on SIGTERM it would kill its workers 30 s later and exit
      1 with a traceback (measured).
    The training processes save a checkpoint and exit 0 (130 for a Ctrl-C,
    which a second Ctrl-C cuts short: fcmae.runtime.signals); the launcher
    waits for the child and exits with its code, 130 after a Ctrl-C.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

    def __init__(self):
        self.received: Optional[int] = None
        self.pid: Optional[int] = None  # torchrun or srun, once started
        self.launcher = ""

    def install(self) -> "Supervisor":
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        self.received = signum
        if self.pid is not None:
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        if self.launcher == "srun":
            targets, sent = [self.pid], signal.SIGUSR1
        else:  # torchrun's children (the ranks), or the one training process
            targets = _children(self.pid) if self.launcher == "torchrun" else [self.pid]
            sent = signum if signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT) else signal.SIGTERM
        for pid in targets:
            try:
                os.kill(pid, sent)
            except ProcessLookupError:
                pass

    def run(self, argv: Sequence[str], env: Mapping[str, str], launcher: str) -> int:
        """Start `argv`, wait for it (passing signals on) and return its exit code (128 + N if killed by N)."""
        self.launcher = launcher
        if launcher == "srun":
            return self._run_detached(argv, env)
        if launcher == "python":  # one process under the restart loop: in a session of its own, as torchrun's ranks
            child = subprocess.Popen(list(argv), env={**env, PARENT_VARIABLE: str(os.getpid())},
                                     start_new_session=True)
            self._started(child.pid)
            return self._exit_code(child.wait())
        # torchrun handles SIGQUIT only (a Ctrl-C reaches it too, and its handler would pass it on to the ranks
        # once more, then kill them). Older torch reads the variable; newer torch sets it from its option
        # --signals-to-handle, whose default comes from PET_SIGNALS_TO_HANDLE (torch 2.14: measured).
        env = {**env, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGQUIT", "PET_SIGNALS_TO_HANDLE": "SIGQUIT"}
        child = subprocess.Popen(list(argv), env=dict(env), preexec_fn=_ignore_stop_signals)
        self._started(child.pid)
        return self._exit_code(child.wait())

    def _exit_code(self, code: int) -> int:
        """The launcher's exit code for the child's: 128 + N if killed by N; 130 after a Ctrl-C the training
        saved for (srun's tasks get SIGUSR1 and exit 0)."""
        if code == 0 and self.received == signal.SIGINT:
            return INTERRUPTED_EXIT_CODE
        return 128 - code if code < 0 else code

    def _run_detached(self, argv: Sequence[str], env: Mapping[str, str]) -> int:
        read_end, write_end = os.pipe()
        helper = subprocess.Popen([sys.executable, "-m", "fcmae.runtime.launch.detach", str(write_end), *argv],
                                  env=dict(env), pass_fds=(write_end,))
        os.close(write_end)
        helper.wait()
        with os.fdopen(read_end) as reports:  # "pid N", then "exit CODE" when srun ends
            for line in reports:
                what, _, value = line.partition(" ")
                if what == "pid":
                    self._started(int(value))
                elif what == "exit":
                    return self._exit_code(int(value))
        print("launch: lost track of srun (its watcher ended without an exit code)", file=sys.stderr, flush=True)
        return 1

    def _started(self, pid: int) -> None:
        self.pid = pid
        if self.received is not None:  # arrived while starting
            self._forward(self.received)


def _ignore_stop_signals() -> None:
    """In torchrun's process, before exec: ignore the signals the launcher passes on (inherited by its workers,
    whose training command installs its own handler for SIGTERM and SIGUSR1), and end with the launcher
    (fcmae.runtime.lifeline: its ranks then end with it)."""
    for s in Supervisor.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent()


def _children(pid: int) -> List[int]:
    """The direct children of `pid` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _srun_environment(env: Mapping[str, str]) -> dict:
    out = dict(env)
    if not out.get("MASTER_ADDR"):
        out["MASTER_ADDR"] = slurm.master_addr(env)
    out.setdefault("MASTER_PORT", "29500")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    supervisor = Supervisor().install()  # first: a stop signal while torch is imported must not kill the launcher
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m fcmae.runtime.launch MODULE [args...]  (MODULE: fcmae.pretrain.main or "
              "finetune.main_finetune)", file=sys.stderr)
        sys.exit(2)
    module, args = argv[0], argv[1:]
    command = importlib.import_module(module).SPEC
    try:
        world = world_from_environment()
    except LaunchError as e:
        command.fail(LaunchError(f"launch: {e}"))
    print(world.describe(), flush=True)
    try:
        cfg = command.resolve([*args, "--world_size", str(world.size)])
        if cfg.dry_run or world.launcher != "python":
            print(command.describe(cfg, world.size), flush=True)
        if cfg.dry_run:
            print("dry run: nothing was trained", flush=True)
            sys.exit(0)
        env = _srun_environment(os.environ) if world.launcher == "srun" else dict(os.environ)
        env.pop(PARENT_VARIABLE, None)  # set only for the processes this launcher starts itself (below)
        full = launch_argv(world, module, args, env)
    except command.usage_errors() + (LaunchError,) as e:
        command.fail(e)
    if supervisor.received is not None:
        print(f"launch: stopped by {signal.Signals(supervisor.received).name} before the training started; "
              "nothing to save", flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE if supervisor.received == signal.SIGINT else 0)
    if world.launcher == "python" and not cfg.max_restarts:
        os.execvpe(full[0], full, env)  # the training process replaces the launcher: every signal reaches it
    print(f"plan checked; starting {world.size} process{'es' if world.size > 1 else ''} with {world.launcher}",
          flush=True)
    if not cfg.max_restarts:
        sys.exit(supervisor.run(full, env, world.launcher))
    from fcmae.runtime.launch import restarts  # imports torch: this module's own imports stay light (handler first)

    print(f"restarts: up to {cfg.max_restarts} after a failure that a restart can mend (not exit codes 2-5)",
          flush=True)
    sys.exit(restarts.run_with_restarts(
        lambda command_line, run_env: supervisor.run(command_line, run_env, world.launcher),
        lambda command_args: launch_argv(world, module, command_args, env), args, env, world.launcher,
        cfg.max_restarts, cfg.output_dir, cfg.resume, lambda: supervisor.received is not None))


if __name__ == "__main__":
    main()
