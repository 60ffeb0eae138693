"""Faults that clusters cause: signals to a whole process group or to the launcher, two runs in one
folder, changed settings on resume, temporary files of killed writes, a full disk, SIGKILL at any
moment, expected errors.

The runs are tiny (custom widths, 64-pixel images, a few optimizer steps).
Where a moment matters, the test waits until log.jsonl shows a given
optimizer step before it acts, so the outcome does not depend on timing.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime import errors, files, lock
from fcmae.runtime.logs import read_jsonl
from finetune import convert
from finetune import main_finetune as finetune_main
from tests import helpers
from tests.helpers import TINY_ARGS, single_process_env, steps_logged, write_images

REPO = Path(__file__).resolve().parents[2]
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


# The shared tiny run, one thread, no pictures (callers change epochs= and num_workers=).
tiny_args = partial(helpers.tiny_args, vis_images=0, cpu_threads=1)


def env_for(tmp_path):
    return single_process_env(OMP_NUM_THREADS="1", FCMAE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))


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
    return _start([sys.executable, "-m", "fcmae.pretrain.main", *map(str, args)], tmp_path)


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
@pytest.mark.slow
def test_signal_to_the_process_group_with_loader_workers_saves(image_dir, tmp_path, signum):
    """Schedulers signal every process of the job, loader workers included: the run saves and exits 0."""
    out = tmp_path / "out"
    proc = start_launcher(tiny_args(image_dir, out, epochs=50, num_workers=2), tmp_path, new_session=True)
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
        launchers = ("fcmae.runtime.launch", "fcmae.runtime.launch.torchrun", "torch.distributed.run")
        return "fcmae.pretrain.main" in a and not any(name in a for name in launchers)

    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if trains(p):
            found.append(p)  # its own children are its loader workers
        else:
            todo.extend(children(p))
    return found


@pytest.mark.parametrize("processes", [1, 2], ids=["python", "torchrun"])
@pytest.mark.slow
def test_signal_to_the_launcher_reaches_the_training_and_is_awaited(image_dir, tmp_path, processes):
    """SIGTERM to launch/pretrain.sh alone: every training process saves and ends, and the launcher waits."""
    out = tmp_path / "out"
    proc = _start(["env", f"NPROC_PER_NODE={processes}", "bash", str(LAUNCH),
                   *map(str, tiny_args(image_dir, out, epochs=50, num_workers=1))], tmp_path)
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
@pytest.mark.slow
def test_second_run_in_the_same_folder_stops_and_names_the_first(image_dir, tmp_path, capsys):
    """The first run in a process of its own, the second (and the third) in this one."""
    out = tmp_path / "out"
    first = start_python(tiny_args(image_dir, out, epochs=50), tmp_path)
    try:
        wait_for_step(first, out, 1)
        owner = json.loads((out / lock.LOCK_NAME).read_text())
        assert owner["pid"] == first.pid and owner["host"] == files.host_name()
        logged = (out / "log.jsonl").read_text()
        with pytest.raises(SystemExit) as exc:
            main_pretrain.main(tiny_args(image_dir, out, "--resume", "none", epochs=50))
        err = capsys.readouterr().err
        assert exc.value.code == 5, f"a second run trained in the folder of a running one (exit {exc.value.code})"
        assert f"pid {first.pid}" in err and len(err.strip().splitlines()) == 1, err
        assert first.poll() is None, "the first run was disturbed"
        assert (out / "log.jsonl").read_text().startswith(logged), "the second run wrote to the log"
    finally:
        first.kill()
        first.wait()
    # The first run was killed holding the lock: the lock is free, a new run proceeds and releases it.
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(image_dir, out, "--exit_after_steps", "1", epochs=50))
    assert exc.value.code == 0, capsys.readouterr().err
    assert not (out / lock.LOCK_NAME).exists(), "the lock outlived the run"


def test_every_rank_checks_the_output_folder_and_only_rank_0_locks_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for enabled in (True, False):  # rank 0 (the lock's check), the other ranks (the check alone)
        with pytest.raises(errors.CheckpointError, match="is not writable"):
            with lock.hold(blocker / "out", enabled=enabled):
                pass
    with lock.hold(tmp_path / "new", enabled=False) as held:
        assert held is None and (tmp_path / "new").is_dir() and not (tmp_path / "new" / lock.LOCK_NAME).exists()


def test_exit_after_steps_is_no_signal_and_never_requeues_the_slurm_job(image_dir, tmp_path, monkeypatch, capsys):
    """The test hook stops and saves like a pre-emption, but inside a SLURM job it must not requeue that job."""
    from fcmae.runtime.launch import slurm

    requeued = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(slurm, "requeue_if_running", lambda env: requeued.append(env.get("SLURM_JOB_ID")))
    out = tmp_path / "out"
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out, "--exit_after_steps", "1"))) == 0
    assert requeued == []
    text = capsys.readouterr().out
    assert "stopped by exit_after_steps" in text and "SIGTERM" not in text
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["run_state"]["step"] == 1


# ---------------------------------------------------------------- 4: changed settings on resume
@pytest.fixture(scope="module")
def mid_epoch_run(image_dir, tmp_path_factory):
    """A run stopped at optimizer step 3 of 12 (mid-epoch 1): its output folder."""
    out = tmp_path_factory.mktemp("mid") / "out"
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out, "--exit_after_steps", "3"))) == 0
    return out


MEANINGFUL = {"batch_size": "2", "effective_batch": "8", "input_size": "96", "epochs": "3", "warmup_epochs": "0",
              "blr": "3e-3", "lr": "1e-4", "min_lr": "1e-6", "mask_ratio": "0.75", "seed": "1",
              "weight_decay": "0.1", "crop_scale": "[0.5,1.0]"}
HARMLESS = {"print_every": "2", "num_workers": "1", "keep_checkpoints": "3", "save_every": "2", "vis_images": "1"}


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
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == 3  # nothing trained, nothing written


@pytest.mark.parametrize("key", sorted(HARMLESS))
def test_resume_with_a_harmless_change_proceeds(mid_epoch_run, tmp_path, image_dir, capsys, key):
    out, code = resume(mid_epoch_run, tmp_path, image_dir, f"--{key}", HARMLESS[key])
    assert code == 0, capsys.readouterr().err
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["config"][key] == int(HARMLESS[key])


def test_resume_on_a_data_set_of_another_size_stops(mid_epoch_run, tmp_path, image_dir, capsys):
    """A moved data set is fine (data_path is harmless); one with other images changes the schedule."""
    smaller = tmp_path / "smaller" / "train" / "a"
    smaller.mkdir(parents=True)
    for image in sorted((image_dir / "train" / "a").iterdir())[:20]:
        shutil.copy(image, smaller)
    out, code = resume(mid_epoch_run, tmp_path, smaller.parent.parent)
    err = capsys.readouterr().err
    assert code == 2 and "number of training images 24 -> 20" in err and "data_path" not in err, err


def check_schedule(out, log_path=None):
    """log.jsonl shows each optimizer step of the plan once, in order, none at lr 0, and no step beyond it."""
    saved = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    planned = saved["config"]["plan"]["total_steps"]
    records = [r for r in read_jsonl(log_path or out / "log.jsonl") if r["type"] == "train"]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeat or go back: {steps}"
    assert all(r["lr"] > 0 for r in records), [(r["step"], r["lr"]) for r in records if r["lr"] <= 0]
    assert steps[-1] == saved["step"] == planned, f"{steps[-1]} optimizer steps where {planned} were planned"
    return steps


@pytest.mark.parametrize("key, value", [("batch_size", "2"), ("effective_batch", "8"), ("effective_batch", "2"),
                                        ("epochs", "3")])
def test_allowed_change_keeps_the_schedule_consistent(mid_epoch_run, tmp_path, image_dir, capsys, key, value):
    """--allow_config_change mid-epoch: the position carries over; exactly the new plan's steps, none at lr 0."""
    out, code = resume(mid_epoch_run, tmp_path, image_dir, f"--{key}", value, "--min_lr", "0",
                       "--allow_config_change")
    text = capsys.readouterr()
    assert code == 0, text.err
    steps = check_schedule(out)
    assert steps[:3] == [1, 2, 3] and steps[3:] == list(range(steps[3], steps[-1] + 1)), steps
    assert "--allow_config_change: resuming under changed settings" in text.out


def test_position_of_a_checkpoint_without_a_stored_plan_is_carried_over():
    """Checkpoints written before the plan was stored: the old plan is recomputed from their settings."""
    from types import SimpleNamespace

    from fcmae.runtime.plan import make_plan
    from fcmae.runtime.resume import RunState, align_state, saved_plan

    settings = dict(batch_size=4, effective_batch=4, update_freq=None, blr=1e-3, lr=None, epochs=2, warmup_epochs=1)
    old = saved_plan({"config": settings, "world_size": 1}, 24)
    assert (old["iters_per_epoch"], old["steps_per_epoch"]) == (6, 6)
    new = make_plan(SimpleNamespace(**{**settings, "effective_batch": 8}), 1, 24)  # 4 x 2 accumulation
    state = RunState(epoch=1, iteration=3, step=9)  # 12 + 12 images seen
    align_state(state, old, new)
    assert (state.epoch, state.iteration, state.step) == (1, 2, 4)  # 8 images into epoch 2 = its step 1
    remaining = (new.iters_per_epoch - state.iteration) // new.update_freq
    assert state.step + remaining == new.total_steps == 6


# ---------------------------------------------------------------- 4, 8: the same in fine-tuning
@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    for split, count in (("train", 8), ("val", 2)):
        for k, name in enumerate(("a", "b")):
            write_images(root / split / name, count, size=40, seed=k)
    return root


def finetune_args(data, out, *extra):
    return ["atto", "none", *TINY_ARGS, "--data_path", str(data), "--output_dir", str(out), "--input_size", "32",
            "--batch_size", "4", "--effective_batch", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--num_workers", "0", "--device", "cpu", "--amp", "off", "--print_every", "1", "--cpu_threads", "1",
            "--model_ema", "false", *extra]


def finetune(argv):
    with pytest.raises(SystemExit) as exc:
        finetune_main.main(argv)
    return exc.value.code


def test_finetune_resume_with_changed_settings(labelled_dir, tmp_path, capsys, monkeypatch):
    threads = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (threads.append(n), real(n)))
    out = tmp_path / "out"
    assert finetune(finetune_args(labelled_dir, out, "--exit_after_steps", "3")) == 0
    assert threads[0] == 1, f"--cpu_threads 1 was not applied: {threads}"
    capsys.readouterr()
    assert finetune(finetune_args(labelled_dir, out, "--seed", "1", "--smoothing", "0.3")) == 2
    err = capsys.readouterr().err
    assert "seed" in err and "smoothing" in err and "--allow_config_change" in err and "--resume none" in err, err
    assert finetune(finetune_args(labelled_dir, out, "--effective_batch", "8", "--allow_config_change")) == 0
    check_schedule(out)
    assert not (out / lock.LOCK_NAME).exists(), "the lock outlived the run"


# ---------------------------------------------------------------- 5, 6: disk
def test_stale_temporary_files_are_removed_at_start(image_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    host = files.host_name()
    stale = [out / f".checkpoint-last.pth.{host}.999999999.k3j_x8a1.tmp", out / ".checkpoint-0001.pth.link.tmp",
             out / ".config.yaml.node-elsewhere.12.q9z2m0pa.tmp", out / ".write-test-abc123"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out, epochs=1))) == 0
    left = [p.name for p in stale if p.exists()]
    assert not left, f"stale temporary files of killed writes were left: {left}"


@pytest.mark.slow
def test_converter_removes_only_temporaries_of_dead_writers(mid_epoch_run, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files.host_name()
    gone = tmp_path / f".dense.pth.{host}.{dead.pid}.ab12cd34.tmp"
    running = tmp_path / f".dense.pth.{host}.{os.getpid()}.ef56gh78.tmp"
    other = tmp_path / f".other.pth.{host}.{dead.pid}.ij90kl12.tmp"
    for path in (gone, running, other):
        path.write_bytes(b"partial")
    with pytest.raises(SystemExit) as exc:
        convert.main([str(mid_epoch_run / "checkpoint-last.pth"), str(tmp_path / "dense.pth"), "--no-verify"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert not gone.exists() and running.exists() and other.exists()


def full_disk_after(monkeypatch, count, match=""):
    """flush_to_disk (every atomic write passes it) fails with ENOSPC from the `count`-th write whose
    temporary's name contains `match` on."""
    real = files.flush_to_disk
    seen = []

    def flush(f):
        name = os.readlink(f"/proc/self/fd/{f.fileno()}")
        if match in Path(name).name:
            seen.append(name)
            if len(seen) >= count:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(f)

    monkeypatch.setattr(files, "flush_to_disk", flush)
    return seen


def test_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(image_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    full_disk_after(monkeypatch, 2, ".checkpoint-last.pth.")
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(image_dir, out, epochs=3))
    err = capsys.readouterr().err
    assert exc.value.code == 4
    assert "no space left on device" in err and f"in {out} " in err and "needs about" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == STEPS_PER_EPOCH  # epoch 1's, intact
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files or the lock left behind"


def test_full_disk_at_start_leaves_nothing_behind(image_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    full_disk_after(monkeypatch, 1, ".config.yaml.")  # the first file after the lock (tests/runtime/test_lock.py)
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(image_dir, out))
    err = capsys.readouterr().err
    assert exc.value.code == 4 and "config.yaml" in err and "Traceback" not in err, err
    # the folder this run made is removed too (fcmae.runtime.output_folder)
    assert not out.exists(), f"left behind: {sorted(p.name for p in out.iterdir())}"


def _writers(tmp_path):
    """Every writer of the project, each writing `target` in tmp_path."""
    from fcmae.pretrain.visualize import save_png
    from fcmae.runtime.config import dump_config
    from fcmae.runtime.logs import JsonlLogger

    def log_rewrite(path):
        if not path.exists():
            path.write_text('{"step": 1}\n{"step": 2}\n')
        JsonlLogger(path).truncate_after("step", 1)

    def converted(path):
        with pytest.raises(SystemExit) as exc:
            convert.main([str(tmp_path / "source.pth"), str(path), "--no-verify"])
        assert exc.value.code == 0, f"fcmae-convert exited with {exc.value.code}"

    return {"checkpoint": lambda p: ckpt.save_checkpoint({"w": torch.ones(64)}, p.parent, 1, 1, 0),
            "config": lambda p: dump_config({"a": 1}, p),
            "picture": lambda p: save_png(np.zeros((8, 8, 3), np.uint8), p),
            "log rewrite": log_rewrite,
            "converter": converted}


WRITER_TARGETS = {"checkpoint": "checkpoint-last.pth", "config": "config.yaml", "picture": "reconstruction.png",
                  "log rewrite": "log.jsonl", "converter": "dense.pth"}


@pytest.fixture
def encoder_weights(tmp_path):
    from fcmae.weights.conversion import build_dense

    torch.save(build_dense((1, 1, 1, 1), (8, 16, 16, 16), False).state_dict(), tmp_path / "source.pth")


@pytest.mark.parametrize("writer", sorted(WRITER_TARGETS))
def test_every_writer_is_atomic_on_a_full_disk_and_honours_the_umask(tmp_path, monkeypatch, capsys, writer,
                                                                     encoder_weights):
    target = tmp_path / WRITER_TARGETS[writer]
    write = _writers(tmp_path)[writer]
    old_umask = os.umask(0o027)
    try:
        write(target)
        assert target.stat().st_mode & 0o777 == 0o640, oct(target.stat().st_mode)
        before = target.read_bytes()
        capsys.readouterr()
        full_disk_after(monkeypatch, 1)
        message = f"no space left on device in {tmp_path} while writing {target.name}: it needs"
        if writer == "converter":
            with pytest.raises(AssertionError, match="exited with 4"):
                write(target)
            err = capsys.readouterr().err
            assert err.startswith(f"fcmae-convert: error: {message}") and len(err.strip().splitlines()) == 1, err
        else:
            with pytest.raises(errors.DiskFullError, match=message):
                write(target)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == before, "the previous file was changed"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"


def test_torch_save_on_a_full_disk_is_recognised_in_the_exception_chain(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`."""
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(errors.DiskFullError, match="needs about 256 B"):
        ckpt.save_atomic({"w": torch.ones(64)}, tmp_path / "x.pth")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- SIGKILL at any moment
@pytest.fixture(scope="module")
def reference_losses(image_dir, tmp_path_factory):
    """(step, loss) of an uninterrupted 2-epoch run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out))) == 0
    return train_losses(out)


def train_losses(out):
    return [(r["step"], r["loss"]) for r in read_jsonl(Path(out) / "log.jsonl") if r["type"] == "train"]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(image_dir, tmp_path, reference_losses):
    step = random.Random().randint(2, 2 * STEPS_PER_EPOCH - 2)
    out = tmp_path / "out"
    proc = start_python(tiny_args(image_dir, out), tmp_path)
    wait_for_step(proc, out, step)
    proc.kill()
    proc.wait()
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out))) == 0
    assert train_losses(out) == reference_losses, f"killed at step {step}"


SLOW_WRITER = """
import os, sys, time
import fcmae.runtime.files as files
marker, target, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, writes = files.flush_to_disk, []
def flush(f):
    real(f)
    if os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}")).startswith(target):
        writes.append(f)
        if len(writes) == nth:
            open(marker, "w").close()
            time.sleep(600)
files.flush_to_disk = flush
from fcmae.pretrain.main import main
main(sys.argv[4:])
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(image_dir, tmp_path, reference_losses):
    """Killed while epoch 2's checkpoint is written (flushed, not yet renamed): epoch 1's stays; the resume
    removes the temporary and reproduces the uninterrupted run."""
    out, marker = tmp_path / "out", tmp_path / "writing"
    script = tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    args = tiny_args(image_dir, out)
    args[args.index("--save_every") + 1] = "0"
    proc = _start([sys.executable, str(script), str(marker), ".checkpoint-last.pth.", "2", *args], tmp_path)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, output(proc)[-3000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    temporaries = [p for p in out.iterdir() if p.name.startswith(".checkpoint-last.pth.")]
    assert temporaries, "the kill did not come during the write"
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == STEPS_PER_EPOCH
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out))) == 0
    assert train_losses(out) == reference_losses
    assert not any(p.exists() for p in temporaries)


# ---------------------------------------------------------------- 7, 8: expected errors, smaller ones
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_one_line(image_dir, tmp_path, capsys):
    args = tiny_args(image_dir, tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "CUDA is not available" in err and "Traceback" not in err, err


def test_convert_with_an_unknown_size_is_one_line(mid_epoch_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        convert.main([str(mid_epoch_run / "checkpoint-last.pth"), str(tmp_path / "dense.pth"), "--size", "giant"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("fcmae-convert: error: ") and "giant" in err, err
    assert not (tmp_path / "dense.pth").exists()


def test_amp_on_cpu_says_it_trains_in_fp32(mid_epoch_run, tmp_path, image_dir, capsys):
    out, code = resume(mid_epoch_run, tmp_path, image_dir, "--amp", "fp16", "--epochs", "2")
    assert code == 0
    assert "note: --amp fp16 has no effect on cpu; training in fp32" in capsys.readouterr().out


def test_nothing_to_do_does_not_claim_a_next_epoch(reference_losses, image_dir, tmp_path_factory, capsys):
    out = next(tmp_path_factory.getbasetemp().glob("reference*")) / "out"
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(image_dir, out))) == 0
    text = capsys.readouterr().out
    assert "all 2 epochs done" in text and "nothing to do" in text and "epoch 3" not in text, text


def test_a_folder_link_loop_lists_each_image_once(tmp_path):
    from fcmae.data.folder import list_images

    write_images(tmp_path / "a", 3)
    (tmp_path / "a" / "self").symlink_to(".")
    (tmp_path / "again").symlink_to(tmp_path / "a")
    assert len(list_images(tmp_path)) == 3


def test_full_disk_while_appending_to_the_log_names_it(tmp_path, monkeypatch):
    from fcmae.runtime.logs import JsonlLogger

    path = tmp_path / "log.jsonl"
    logger = JsonlLogger(path)
    logger.write({"step": 1})
    real_open = open

    class FullFile:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", FullFile)
    with pytest.raises(errors.DiskFullError, match=f"in {tmp_path} while writing log.jsonl"):
        logger.write({"step": 2})
