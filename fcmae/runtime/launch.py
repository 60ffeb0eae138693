"""Start a training command on this machine's GPUs: `python -m fcmae.runtime.launch MODULE [args...]`.

launch/pretrain.sh and launch/finetune.sh call this; it decides everything
they used to decide in bash, with the command's own flag parser:

1. the world: processes per node (`NPROC_PER_NODE`, else the GPUs that
   `nvidia-smi -L` lists, honouring CUDA_VISIBLE_DEVICES, else 1 CPU process)
   x nodes (`NNODES`; inside a SLURM allocation `SLURM_JOB_NUM_NODES`);
2. the launcher: `FCMAE_LAUNCHER` (python | torchrun | srun) if set; else
   srun inside a SLURM allocation (sbatch/salloc, not already in a step),
   torchrun for several processes, plain python for one;
3. the config, resolved by MODULE's `COMMAND.resolve` with `--world_size`:
   bad input stops here with one line and exit code 2;
4. with `--dry_run` (as MODULE reads it: `--dry_run`, `--dry_run=yes`,
   `--dry_run true` ...), the plan is printed and nothing is started;
   otherwise the plan is printed for several processes, then the launcher
   replaces this process.

`world_from_environment` is the one place that reads the world from the
environment; a scheduler's variables belong there.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

LAUNCHERS = ("python", "torchrun", "srun")


class LaunchError(ValueError):
    """An environment the launcher cannot start from; the message says what to set."""


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


def count_gpus(env: Mapping[str, str]) -> int:
    """GPUs on this node: those `nvidia-smi -L` lists, limited by CUDA_VISIBLE_DEVICES (0 without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(line.startswith("GPU") for line in listed.splitlines())
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0 if visible.strip() in ("", "-1") else min(count, len(visible.split(",")))
    return count


def world_from_environment(env: Optional[Mapping[str, str]] = None) -> World:
    """The launcher and the number of nodes and processes, from the environment (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("NPROC_PER_NODE"):
        gpus = _positive_int(env, "NPROC_PER_NODE", 1)
    else:
        gpus = count_gpus(env)
    nproc = max(gpus, 1)
    in_allocation = bool(env.get("SLURM_JOB_ID"))
    if in_allocation and not env.get("NNODES"):
        nnodes = _positive_int(env, "SLURM_JOB_NUM_NODES", 1)
    else:
        nnodes = _positive_int(env, "NNODES", 1)
    launcher = env.get("FCMAE_LAUNCHER", "")
    if launcher and launcher not in LAUNCHERS:
        raise LaunchError(f"unknown FCMAE_LAUNCHER {launcher!r} ({', '.join(LAUNCHERS)})")
    if not launcher:
        if in_allocation and not env.get("SLURM_STEP_ID") and shutil.which("srun"):
            launcher = "srun"
        else:
            launcher = "torchrun" if nnodes * nproc > 1 else "python"
    return World(launcher, nnodes, nproc, gpus)


def launch_argv(world: World, module: str, args: Sequence[str], env: Mapping[str, str]) -> List[str]:
    """The command line that starts `module` on every process of `world`."""
    python = sys.executable
    script = ["-m", module, *args, "--world_size", str(world.size)]
    if world.launcher == "python":
        return [python, *script]
    if world.launcher == "torchrun":
        run = [python, "-m", "fcmae.runtime.torchrun"]  # torchrun, one line instead of its traceback on failure
        if world.nnodes == 1:
            return [*run, "--standalone", "--nnodes", "1", "--nproc_per_node", str(world.nproc_per_node), *script]
        for name, what in (("MASTER_ADDR", "the address of the node with NODE_RANK=0"),
                           ("NODE_RANK", "0 .. NNODES-1 on each node")):
            if not env.get(name):
                raise LaunchError(f"multi-node runs need {name} ({what})")
        return [*run, "--nnodes", str(world.nnodes), "--node_rank", env["NODE_RANK"], "--nproc_per_node",
                str(world.nproc_per_node), "--master_addr", env["MASTER_ADDR"], "--master_port",
                env.get("MASTER_PORT", "29500"), *script]
    # srun: one task per GPU; SLURM's SIGTERM (or --signal=USR1@...) before pre-emption makes the
    # training save a checkpoint at the next step and exit cleanly.
    return ["srun", "--nodes", str(world.nnodes), "--ntasks-per-node", str(world.nproc_per_node),
            "--kill-on-bad-exit=1", python, "-u", *script]


def _srun_environment(env: Mapping[str, str]) -> dict:
    out = dict(env)
    if not out.get("MASTER_ADDR"):
        hosts = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")],
                               capture_output=True, text=True).stdout.split()
        out["MASTER_ADDR"] = hosts[0] if hosts else "127.0.0.1"
    out.setdefault("MASTER_PORT", "29500")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m fcmae.runtime.launch MODULE [args...]  (MODULE: fcmae.main_pretrain or "
              "finetune.main_finetune)", file=sys.stderr)
        sys.exit(2)
    module, args = argv[0], argv[1:]
    command = importlib.import_module(module).COMMAND
    try:
        world = world_from_environment()
    except LaunchError as e:
        command.fail(f"launch: {e}")
    print(world.describe(), flush=True)
    try:
        cfg = command.resolve([*args, "--world_size", str(world.size)])
        if cfg.dry_run or world.launcher != "python":
            print(command.describe(cfg, world.size), flush=True)
        if cfg.dry_run:
            print("dry run: nothing was trained", flush=True)
            sys.exit(0)
        env = _srun_environment(os.environ) if world.launcher == "srun" else dict(os.environ)
        full = launch_argv(world, module, args, env)
    except command.usage_errors() + (LaunchError,) as e:
        command.fail(e)
    if world.launcher != "python":
        print(f"plan checked; starting {world.size} processes with {world.launcher}", flush=True)
    os.execvpe(full[0], full, env)


if __name__ == "__main__":
    main()
