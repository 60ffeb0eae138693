"""Faults that clusters cause: signals to a whole process group or to the launcher, two runs in one
folder, changed settings on resume, temporary files of killed writes, a full disk, expected errors.

The runs are tiny (custom widths, 64-pixel images, a few optimizer steps).
Where a moment matters, the test waits until log.jsonl shows a given
optimizer step before it acts, so the outcome does not depend on timing.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.runtime import checkpoint as ckpt
from fcmae import main_pretrain
from fcmae.runtime.logs import read_jsonl

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "pretrain.sh"
STEPS_PER_EPOCH = 6  # 24 images, batch 4, no accumulation


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_data")
    rng = np.random.RandomState(0)
    (root / "train" / "a").mkdir(parents=True)
    for i in range(24):
        Image.fromarray((rng.rand(72, 72, 3) * 255).astype(np.uint8)).save(root / "train" / "a" / f"{i:02d}.png")
    return root


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
                "NPROC_PER_NODE", "NNODES", "FCMAE_LAUNCHER"):
        monkeypatch.delenv(var, raising=False)


def tiny_args(data, out, *extra, epochs=2, workers=0):
    return ["atto", "demo", "--data_path", str(data), "--output_dir", str(out),
            "--depths", "[1,1,1,1]", "--dims", "[8,16,16,16]", "--decoder_dim", "32",
            "--input_size", "64", "--mask_ratio", "0.5", "--batch_size", "4", "--effective_batch", "4",
            "--epochs", str(epochs), "--warmup_epochs", "1", "--num_workers", str(workers), "--print_every", "1",
            "--vis_images", "0", "--save_every", "1", "--keep_checkpoints", "2", "--device", "cpu",
            "--cpu_threads", "1", *extra]


def env_for(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE")}
    env.update(OMP_NUM_THREADS="1", FCMAE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    return env


def _start(cmd, tmp_path, new_session=False):
    """Start `cmd` with its output in a file (a pipe would keep the test waiting for orphans)."""
    log = tmp_path / f"run-{len(list(tmp_path.glob('run-*.log')))}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(tmp_path), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=new_session)
    proc.log = log
    return proc


def output(proc):
    return proc.log.read_text(errors="replace")


def start_launcher(args, tmp_path, new_session=False):
    return _start(["bash", str(LAUNCH), *map(str, args)], tmp_path, new_session)


def start_python(args, tmp_path):
    return _start([sys.executable, "-m", "fcmae.main_pretrain", *map(str, args)], tmp_path)


def steps_logged(out):
    path = Path(out) / "log.jsonl"
    try:
        return [r["step"] for r in read_jsonl(path) if r["type"] == "train"] if path.exists() else []
    except ValueError:  # a line being written
        return []


def wait_for_step(proc, out, step, timeout=120):
    """Wait until log.jsonl shows optimizer step >= `step` (fails with the output if the run ends first)."""
    deadline = time.monotonic() + timeout
    while True:
        steps = steps_logged(out)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before step {step}:\n{output(proc)[-3000:]}")
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def finish(proc, timeout=120):
    """Wait for the process itself (not for its children); returns (exit code, output)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n{output(proc)[-3000:]}")
    return proc.returncode, output(proc)


def children(pid):
    """Direct children of `pid` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def newest_step(out):
    path = ckpt.find_latest_checkpoint(out)
    return None if path is None else int(ckpt.load_checkpoint(path)["step"])


# ---------------------------------------------------------------- 1, 2: signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_signal_to_the_process_group_with_loader_workers_saves(image_dir, tmp_path, signum):
    """Schedulers signal every process of the job, loader workers included: the run saves and exits 0."""
    out = tmp_path / "out"
    proc = start_launcher(tiny_args(image_dir, out, epochs=50, workers=2), tmp_path, new_session=True)
    seen = wait_for_step(proc, out, 2)
    os.killpg(proc.pid, signum)
    try:
        code, text = finish(proc)
    finally:
        try:  # whatever the launcher left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert f"stopped by {signal.Signals(signum).name}" in text and "Traceback" not in text, text[-3000:]
    step = newest_step(out)
    assert step is not None and step >= seen, f"newest checkpoint at step {step}, the stop came at {seen}"


def training_processes(pid):
    """`pid` and its descendants that run the training command, not the launcher, torchrun or loader workers."""
    def argv(p):
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return []

    def trains(p):
        a = argv(p)
        return "fcmae.main_pretrain" in a and "fcmae.runtime.launch" not in a and "torch.distributed.run" not in a

    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if trains(p):
            found.append(p)  # its own children are its loader workers
        else:
            todo.extend(children(p))
    return found


@pytest.mark.parametrize("processes", [1, 2], ids=["python", "torchrun"])
def test_signal_to_the_launcher_reaches_the_training_and_is_awaited(image_dir, tmp_path, processes):
    """SIGTERM to launch/pretrain.sh alone: every training process saves and ends, and the launcher waits."""
    out = tmp_path / "out"
    proc = _start(["env", f"NPROC_PER_NODE={processes}", "bash", str(LAUNCH),
                   *map(str, tiny_args(image_dir, out, epochs=50, workers=1))], tmp_path)
    seen = wait_for_step(proc, out, 2)
    training = training_processes(proc.pid)
    assert len(training) == processes, f"training processes under the launcher: {training}"
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc)
    orphans = [p for p in training if alive(p)]
    for p in orphans:
        os.kill(p, signal.SIGKILL)
    assert not orphans, f"the launcher exited ({code}) and left the training running: pids {orphans}"
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert text.count("stopped by SIGTERM") == 1 and "Traceback" not in text, text[-3000:]
    step = newest_step(out)
    assert step is not None and step >= seen
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["world_size"] == processes


# ---------------------------------------------------------------- 3: two runs, one folder
def test_second_run_in_the_same_folder_stops_and_names_the_first(image_dir, tmp_path):
    out = tmp_path / "out"
    first = start_python(tiny_args(image_dir, out, epochs=50), tmp_path)
    try:
        wait_for_step(first, out, 1)
        second = start_python(tiny_args(image_dir, out, epochs=50), tmp_path)
        code, text = finish(second, timeout=60)
        assert code != 0, f"a second run trained in the folder of a running one:\n{text[-2000:]}"
        assert str(first.pid) in text and "Traceback" not in text, text[-2000:]
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.kill()
        first.wait()
    # The first run died without releasing its lock: the lock is stale, a new run proceeds.
    rerun = start_python(tiny_args(image_dir, out, epochs=1), tmp_path)
    code, text = finish(rerun)
    assert code == 0, text[-3000:]


# ---------------------------------------------------------------- 4: changed settings on resume
@pytest.fixture(scope="module")
def mid_epoch_run(image_dir, tmp_path_factory):
    """A run stopped at optimizer step 3 of 12 (mid-epoch 1): its output folder."""
    out = tmp_path_factory.mktemp("mid") / "out"
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out, "--exit_after_steps", "3"))) == 0
    return out


MEANINGFUL = {"batch_size": "2", "effective_batch": "8", "input_size": "96", "epochs": "3", "warmup_epochs": "0",
              "blr": "3e-3", "lr": "1e-4", "min_lr": "1e-6", "mask_ratio": "0.75", "seed": "1"}
HARMLESS = {"print_every": "2", "num_workers": "1", "keep_checkpoints": "3"}


def resume(mid_epoch_run, tmp_path, image_dir, *extra):
    out = tmp_path / "out"
    shutil.copytree(mid_epoch_run, out)
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(image_dir, out, *extra))
    return out, exc.value.code


@pytest.mark.parametrize("key", sorted(MEANINGFUL))
def test_resume_with_a_changed_setting_stops(mid_epoch_run, tmp_path, image_dir, capsys, key):
    out, code = resume(mid_epoch_run, tmp_path, image_dir, f"--{key}", MEANINGFUL[key])
    err = capsys.readouterr().err
    assert code == 2, f"resumed with a changed {key} (exit {code})"
    assert key in err and "--allow_config_change" in err and "--resume none" in err, err
    assert "Traceback" not in err
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == 3  # nothing trained, nothing written


@pytest.mark.parametrize("key", sorted(HARMLESS))
def test_resume_with_a_harmless_change_proceeds(mid_epoch_run, tmp_path, image_dir, capsys, key):
    out, code = resume(mid_epoch_run, tmp_path, image_dir, f"--{key}", HARMLESS[key])
    assert code == 0, capsys.readouterr().err
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["config"][key] == int(HARMLESS[key])


def test_allowed_change_of_batch_keeps_the_schedule_consistent(mid_epoch_run, tmp_path, image_dir, capsys):
    """--allow_config_change, batch 4 -> 2 mid-epoch: no step beyond the plan, none at lr 0."""
    out, code = resume(mid_epoch_run, tmp_path, image_dir, "--batch_size", "2", "--allow_config_change")
    assert code == 0, capsys.readouterr().err
    records = [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeat or go back: {steps}"
    assert all(r["lr"] > 0 for r in records), [(r["step"], r["lr"]) for r in records if r["lr"] <= 0]
    saved = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    planned = saved["config"].get("plan", {}).get("total_steps") or main_pretrain.make_plan(
        saved["config"], 1, 24)["total_steps"]
    assert steps[-1] <= planned, f"{steps[-1]} optimizer steps where {planned} were planned"


# ---------------------------------------------------------------- 5, 6: disk
def test_stale_temporary_files_are_removed_at_start(image_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".checkpoint-last.pth.k3j_x8a1.tmp", out / ".checkpoint-0001.pth.link.tmp",
             out / ".config.yaml.q9z2m0pa"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out, epochs=1))) == 0
    left = [p.name for p in stale if p.exists()]
    assert not left, f"stale temporary files of killed writes were left: {left}"


def test_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(image_dir, tmp_path, monkeypatch, capsys):
    """An injected ENOSPC in the second checkpoint write (torch.save writes part of the file, then fails)."""
    out = tmp_path / "out"
    real_save = torch.save
    calls = []

    def full_disk_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) >= 2:
            if hasattr(f, "write"):
                f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(image_dir, out, epochs=3))
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None)
    assert "No space left" in err and str(out) in err and "Traceback" not in err, err
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == STEPS_PER_EPOCH  # epoch 1's, intact
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


# ---------------------------------------------------------------- 7: expected errors are one line
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_one_line(image_dir, tmp_path):
    args = tiny_args(image_dir, tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    code, text = finish(start_python(args, tmp_path))
    assert code != 0 and "CUDA is not available" in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]


def test_convert_with_an_unknown_size_is_one_line(image_dir, tmp_path, mid_epoch_run):
    result = subprocess.run([sys.executable, "-m", "finetune.convert", str(mid_epoch_run / "checkpoint-last.pth"),
                             str(tmp_path / "dense.pth"), "--size", "giant"], cwd=REPO, env=env_for(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "giant" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
