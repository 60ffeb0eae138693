"""Pre-emption without a scheduler: the world a SLURM allocation gives, ranks only inside an srun step,
a stop seen at the next iteration, a stop saved before the epoch's evaluation.

(tests/runtime/test_slurm.py runs the same under a real SLURM; tests/runtime/test_faults.py signals real processes.)
"""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import pytest
import torch

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.distributed import env_rank_info
from fcmae.runtime.errors import LaunchError
from fcmae.runtime.launch import launcher as launch
from fcmae.runtime.launch.launcher import slurm, world_from_environment
from fcmae.runtime.logs import read_jsonl
from tests import helpers
from tests.helpers import single_process_env

# `sbatch --ntasks-per-node 2` on one CPU node, in the batch shell (no step).
BATCH_SHELL = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
               "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.fixture
def no_gpus(monkeypatch):
    monkeypatch.setattr(launch, "count_gpus", lambda: 0)


# ---------------------------------------------------------------- the world of an allocation
def test_the_world_comes_from_the_slurm_allocation(no_gpus):
    world = world_from_environment({**BATCH_SHELL, "FCMAE_LAUNCHER": "srun"})
    assert (world.launcher, world.nnodes, world.nproc_per_node, world.size) == ("srun", 1, 2, 2)
    assert "world size 2 (CPU)" in world.describe()
    # -n 8 on 2 nodes leaves SLURM_NTASKS_PER_NODE unset; GPUs from SLURM_GPUS_ON_NODE.
    gpu = world_from_environment({"SLURM_JOB_ID": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)",
                                  "SLURM_GPUS_ON_NODE": "4", "FCMAE_LAUNCHER": "srun"})
    assert (gpu.nnodes, gpu.nproc_per_node, gpu.size, gpu.gpus_per_node) == (2, 4, 8, 4)
    assert "world size 8 (4 GPU(s) per node)" in gpu.describe()
    argv = launch.launch_argv(gpu, "fcmae.pretrain.main", ["atto"], {})
    assert argv[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "4"] and "--kill-on-bad-exit=1" in argv


def test_nproc_per_node_that_disagrees_with_the_allocation_names_both(no_gpus):
    with pytest.raises(LaunchError, match=r"NPROC_PER_NODE=4 .* 2 task\(s\) per node \(SLURM_NTASKS_PER_NODE\)"):
        world_from_environment({**BATCH_SHELL, "NPROC_PER_NODE": "4", "FCMAE_LAUNCHER": "srun"})
    assert world_from_environment({**BATCH_SHELL, "NPROC_PER_NODE": "2", "FCMAE_LAUNCHER": "srun"}).size == 2
    with pytest.raises(LaunchError, match="different task counts"):
        world_from_environment({**BATCH_SHELL, "SLURM_NTASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "2,1",
                                "FCMAE_LAUNCHER": "srun"})
    from fcmae.runtime.launch.slurm import parse_tasks_per_node

    assert [parse_tasks_per_node(v) for v in ("2", "8(x4)", "3(x2),3")] == [2, 8, 3]


def test_cpu_processes_are_not_labelled_as_gpus(no_gpus):
    world = world_from_environment({"NPROC_PER_NODE": "2"})
    assert (world.launcher, world.size, world.gpus_per_node) == ("torchrun", 2, 0)
    assert "world size 2 (CPU)" in world.describe()


def test_the_gpus_per_node_are_those_torch_sees_outside_slurm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    world = world_from_environment({})
    assert (world.launcher, world.size, world.gpus_per_node) == ("torchrun", 2, 2)
    assert "world size 2 (2 GPU(s) per node)" in world.describe()


def test_master_addr_is_the_allocations_first_host(tmp_path, monkeypatch):
    """One function for the launcher (srun's environment) and for ranks started without it."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$3" = "node[3-4]" ] && printf "node3\\nnode4\\n" || exit 1\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.master_addr({"SLURM_JOB_NODELIST": "node[3-4]"}) == "node3"
    assert slurm.master_addr({"SLURM_NODELIST": "node[3-4]"}) == "node3"
    assert slurm.master_addr({"SLURM_JOB_NODELIST": "bad["}) == "127.0.0.1"  # scontrol fails
    assert slurm.master_addr({}) == "127.0.0.1"
    srun_env = launch._srun_environment({"SLURM_JOB_NODELIST": "node[3-4]"})
    assert (srun_env["MASTER_ADDR"], srun_env["MASTER_PORT"]) == ("node3", "29500")
    assert launch._srun_environment({"SLURM_JOB_NODELIST": "node[3-4]", "MASTER_ADDR": "h"})["MASTER_ADDR"] == "h"
    monkeypatch.setenv("PATH", str(tmp_path / "missing"))  # no scontrol at all
    assert slurm.master_addr({"SLURM_JOB_NODELIST": "node[3-4]"}) == "127.0.0.1"


# ---------------------------------------------------------------- ranks only inside an srun step
@pytest.mark.parametrize("extra", [{}, {"FCMAE_LAUNCHER": "python"}], ids=["plain", "FCMAE_LAUNCHER=python"])
def test_plain_python_inside_an_allocation_is_one_process(extra, no_gpus):
    """`python -m fcmae.pretrain.main` in `sbatch --ntasks-per-node 8` / `salloc -n 8`: world size 1, not a rank."""
    env = {**BATCH_SHELL, "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8", **extra}
    assert env_rank_info(env) == {"rank": 0, "world_size": 1, "local_rank": 0}
    if extra:
        assert world_from_environment(env).size == 1


def test_slurm_ranks_inside_a_step_or_with_the_launchers_marker():
    step = {**BATCH_SHELL, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
            "SLURM_LOCALID": "1"}
    assert env_rank_info(step) == {"rank": 1, "world_size": 2, "local_rank": 1}
    marked = {**BATCH_SHELL, "SLURM_PROCID": "1", "FCMAE_SLURM_RANKS": "1"}
    assert env_rank_info(marked)["world_size"] == 2
    # the launcher run as one task of a step starts one process: the step's world
    world = world_from_environment({**step, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": "2"})
    assert (world.launcher, world.size) == ("python", 2)


def test_a_rank_of_a_two_node_step_is_its_rank_in_the_job_not_on_its_node():
    """Task 3 of 4 on two nodes of 2 tasks: rank 3 (SLURM_PROCID), local rank 1 (SLURM_LOCALID)."""
    step = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "4",
            "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    assert env_rank_info(step) == {"rank": 3, "world_size": 4, "local_rank": 1}
    assert env_rank_info({**step, "SLURM_PROCID": "2", "SLURM_LOCALID": "0"})["rank"] == 2


# ---------------------------------------------------------------- when the stop is seen, what is saved first
# The shared tiny run with the command's own batch size, effective batch and checkpoints kept.
tiny_args = partial(helpers.tiny_args, batch_size=None, effective_batch=None, keep_checkpoints=None)


def run(args):
    return main_pretrain.run(main_pretrain.resolve_config(args))


def records(out, kind):
    return [r for r in read_jsonl(Path(out) / "log.jsonl") if r["type"] == kind]


def signal_at_training_call(monkeypatch, call: int):
    """SIGUSR1 to this process during the `call`-th training forward pass; returns the call counter."""
    real_build, calls = main_pretrain.build_fcmae, {"n": 0}

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward = model.forward

        def counting_forward(imgs, mask=None):
            if model.training:
                calls["n"] += 1
                if calls["n"] == call:
                    os.kill(os.getpid(), signal.SIGUSR1)
            return forward(imgs, mask)

        model.forward = counting_forward
        return model

    monkeypatch.setattr(main_pretrain, "build_fcmae", build)
    return calls


def test_stop_between_optimizer_steps_is_seen_at_the_next_iteration(image_dir, tmp_path, monkeypatch):
    """Accumulating 2 iterations per step: a signal in iteration 5 stops after it, saved at step 2, exactly."""
    accum = ("--batch_size", "2", "--effective_batch", "4")  # 12 iterations, 6 optimizer steps per epoch
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(tiny_args(image_dir, ref, *accum)) == 0
    calls = signal_at_training_call(monkeypatch, 5)
    assert run(tiny_args(image_dir, out, *accum)) == 0
    assert calls["n"] == 5, f"the stop was seen only after {calls['n']} iterations"
    saved = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert (saved["step"], saved["run_state"]["iteration"]) == (2, 4)
    monkeypatch.undo()
    assert run(tiny_args(image_dir, out, *accum)) == 0
    assert [(r["step"], r["loss"]) for r in records(out, "train")] == \
           [(r["step"], r["loss"]) for r in records(ref, "train")]
    assert [r["loss"] for r in records(out, "epoch")] == [r["loss"] for r in records(ref, "epoch")]


def test_stop_in_an_epochs_last_iteration_is_saved_before_the_epochs_evaluation(image_dir, tmp_path, monkeypatch):
    """The checkpoint comes first; the end-of-epoch work (summary, picture; validation when fine-tuning)
    is left to the resumed run, which then matches an uninterrupted one."""
    plain = ("--batch_size", "4", "--effective_batch", "4")  # 6 iterations = 6 optimizer steps per epoch
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(tiny_args(image_dir, ref, *plain)) == 0
    signal_at_training_call(monkeypatch, 6)
    assert run(tiny_args(image_dir, out, *plain)) == 0
    saved = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert (saved["epoch"], saved["run_state"]["iteration"], saved["step"]) == (0, 6, 6)
    assert records(out, "epoch") == [] and not (out / "reconstruction.png").exists(), "evaluated before saving"
    monkeypatch.undo()
    assert run(tiny_args(image_dir, out, *plain)) == 0
    assert [(r["step"], r["loss"]) for r in records(out, "train")] == \
           [(r["step"], r["loss"]) for r in records(ref, "train")]
    assert [r["loss"] for r in records(out, "epoch")] == [r["loss"] for r in records(ref, "epoch")]


FAKE_SCONTROL = """#!/bin/sh
echo "$*" >> "$FCMAE_TEST_SCONTROL_CALLS"
[ "$1" = show ] && echo "JobId=$4 JobName=fcmae-pretrain JobState=RUNNING Requeue=1 Restarts=0"
exit 0
"""


def test_a_one_task_job_signalled_with_usr1_saves_and_requeues_itself_once(image_dir, tmp_path, monkeypatch, capsys):
    """Rank 0 of a one-task SLURM job (SLURM_JOB_ID set, no step): SIGUSR1 saves, then `scontrol requeue` runs
    once. scontrol is a script on PATH that records its calls and shows the job RUNNING and requeueable."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FCMAE_TEST_SCONTROL_CALLS", str(calls))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    signal_at_training_call(monkeypatch, 2)
    out = tmp_path / "out"
    assert run(tiny_args(image_dir, out, "--batch_size", "4", "--effective_batch", "4")) == 0
    text = capsys.readouterr().out
    assert "stopped by SIGUSR1 at epoch 1" in text and "requeued SLURM job 4242" in text, text[-2000:]
    assert calls.read_text().splitlines() == ["show job -o 4242", "requeue 4242"]
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == 2


# ---------------------------------------------------------------- the documented batch script
def test_the_slurm_guide_shows_the_batch_script_the_slurm_tests_submit():
    repo = Path(__file__).resolve().parents[2]
    lines = (repo / "launch" / "pretrain.sbatch").read_text().splitlines()
    body = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("#SBATCH")):])
    assert "#SBATCH --signal=USR1@" in body and "#SBATCH --requeue" in body
    for doc in ("docs/fault-tolerance-and-slurm.md",):
        assert f"```bash\n{body}\n```" in (repo / doc).read_text(), f"{doc} does not show launch/pretrain.sbatch"


# ---------------------------------------------------------------- a signal while torch is imported
@pytest.mark.slow
def test_a_stop_signal_while_torch_is_imported_stops_the_run_cleanly(image_dir, tmp_path):
    """`--signal=USR1@N` may come while a task still imports torch: the handler is already there (the signal is
    kept, the run saves after its first iteration and exits 0) instead of the signal killing the process."""
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fcmae.pretrain.main",
                             *tiny_args(image_dir, out, "--batch_size", "4", "--effective_batch", "4")], cwd=repo,
                            env=single_process_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():  # torch is being imported
        assert proc.poll() is None and time.monotonic() < deadline, "the command ended before importing torch"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{text[-2000:]}"
    assert "stopped by SIGUSR1" in text and "Traceback" not in text, text[-2000:]
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == 1
