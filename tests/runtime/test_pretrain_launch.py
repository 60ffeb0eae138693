"""launch/pretrain.sh: the plan, the dry run, clear early errors, and a 2-process DDP run on CPU."""

import subprocess
from pathlib import Path

import pytest
import torch

from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.logs import read_jsonl
from tests.helpers import TINY_ARGS, single_process_env

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "pretrain.sh"


def launch(*args, env=None, timeout=300):
    return subprocess.run(["bash", str(LAUNCH), *map(str, args)], cwd=REPO, env=single_process_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_headline_command_without_data_path_stops_with_a_clear_message():
    result = launch("huge", "800ep")
    assert result.returncode != 0
    assert "--data_path" in result.stderr and "launch/pretrain.sh atto demo" in result.stderr


@pytest.mark.slow
def test_usage_and_unknown_names():
    assert launch().returncode == 2
    result = launch("giant", "800ep", "--data_path", "/tmp")
    assert result.returncode != 0 and "unknown ConvNeXt V2 size 'giant'" in result.stderr


@pytest.mark.slow
def test_dry_run_prints_the_plan_for_many_gpus(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(5000):  # a dry run counts the files (and reads none): more than one optimizer step
        (tmp_path / "train" / f"{i}.jpg").write_bytes(b"")
    result = launch("huge", "800ep", "--data_path", tmp_path, "--dry_run",
                    env={"NPROC_PER_NODE": "8", "NNODES": "4"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "world size       32" in out
    assert "per-GPU batch    32" in out
    assert "accumulation     4" in out
    assert "effective batch  4096" in out
    assert "lr               0.0024" in out
    assert "800 epochs, 40 warmup" in out
    assert "per epoch        4096 of 5000 images in 4 batches of 1024; 904 left out each epoch" in out
    assert "dry run: nothing was trained" in out
    assert not (REPO / "output" / "pretrain" / "huge_800ep").exists()
    # Reference flag names keep working and override the config.
    result = launch("base", "1600ep", "--model", "convnextv2_base", "--data_path", tmp_path, "--batch_size", "64",
                    "--update_freq", "2", "--blr", "1.5e-4", "--dry_run", env={"NPROC_PER_NODE": "8"})
    assert result.returncode == 0, result.stderr
    assert "accumulation     2" in result.stdout and "effective batch  1024" in result.stdout
    assert "1600 epochs" in result.stdout


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "out"
    result = launch(
        "atto", "demo", "--output_dir", out, *TINY_ARGS,
        "--decoder_dim", "32", "--input_size", "64", "--batch_size", "4", "--effective_batch", "8",
        "--epochs", "1", "--demo_per_photo", "2", "--demo_crop_size", "64", "--num_workers", "1",
        "--print_every", "1", "--device", "cpu",
        env={"NPROC_PER_NODE": "2", "FCMAE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torchrun" in result.stdout and "world size       2" in result.stdout
    assert "plan checked; starting 2 processes with torchrun" in result.stdout
    assert "dry run: nothing was trained" not in result.stdout
    records = [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
    # 18 photos x 2 crops = 36 images: 18 per process, 4 iterations of 4 each.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    state = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each process its own masks


@pytest.mark.slow
def test_dry_run_false_is_a_real_run(tmp_path):
    """`--dry_run false` must not be taken for a dry run by the launcher."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.jpg").write_bytes(b"")
    dry = launch("atto", "800ep", "--data_path", tmp_path, "--dry_run", "true", "--output_dir", tmp_path / "out")
    assert dry.returncode == 0 and "dry run: nothing was trained" in dry.stdout
    real = launch("atto", "800ep", "--data_path", tmp_path, "--dry_run", "false", "--output_dir", tmp_path / "out")
    assert "dry run: nothing was trained" not in real.stdout
    assert real.returncode != 0, "one empty image cannot fill a batch: the real run must stop with an error"
    assert "batch" in real.stderr.lower() or "image" in real.stderr.lower(), real.stderr


@pytest.mark.slow
def test_dry_run_yes_is_a_dry_run_for_the_launcher_too(tmp_path):
    """The launcher reads --dry_run with the command's parser: `--dry_run=yes` starts no processes."""
    (tmp_path / "train").mkdir()
    for i in range(2):  # one per process
        (tmp_path / "train" / f"{i}.jpg").write_bytes(b"")
    result = launch("atto", "800ep", "--data_path", tmp_path, "--dry_run=yes", env={"NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing was trained" in result.stdout and "starting" not in result.stdout
    assert "world size       2" in result.stdout


def test_world_and_launcher_from_the_environment():
    from fcmae.runtime.errors import LaunchError
    from fcmae.runtime.launch.launcher import launch_argv, world_from_environment

    world = world_from_environment({"NPROC_PER_NODE": "8", "NNODES": "4"})
    assert (world.launcher, world.size) == ("torchrun", 32)
    with pytest.raises(LaunchError, match="NODE_RANK"):
        launch_argv(world, "fcmae.pretrain.main", [], {"MASTER_ADDR": "host0"})
    argv = launch_argv(world, "fcmae.pretrain.main", ["atto"], {"MASTER_ADDR": "host0", "NODE_RANK": "1"})
    assert argv[-3:] == ["atto", "--world_size", "32"] and "--node_rank" in argv
    slurm = world_from_environment({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "NPROC_PER_NODE": "4",
                                    "FCMAE_LAUNCHER": "srun"})
    assert (slurm.launcher, slurm.nnodes, slurm.size) == ("srun", 2, 8)
    single = world_from_environment({"NPROC_PER_NODE": "1"})
    assert (single.launcher, single.size) == ("python", 1)
    for bad in ({"FCMAE_LAUNCHER": "mpirun"}, {"NPROC_PER_NODE": "two"}):
        with pytest.raises(LaunchError):
            world_from_environment(bad)
