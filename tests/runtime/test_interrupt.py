"""Ctrl-C (SIGINT): the first one ends the step, saves like a pre-emption, says so in one line and exits 130;
a second one stops at once; outside the training loop, and in the evaluation commands (which have nothing
to save), it stops at once. One line each, never a traceback.

The in-process tests send SIGINT from inside a training step, so the moment is exact; the slow ones send it
to a real run's process group, as a terminal does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime import lock
from fcmae.runtime.logs import read_jsonl
from finetune import main_finetune
from tests.eval.test_knn_linprobe import make_folder
from tests.helpers import TINY_ARGS, single_process_env, write_images
from tests.runtime.test_faults import (
    LAUNCH,
    REPO,
    _start,
    alive,
    finish,
    start_launcher,
    tiny_args,
    training_processes,
    wait_for_step,
)

INTERRUPTED = re.compile(r"^interrupted at epoch (\d+), step (\d+); checkpoint saved in (.+); run the same command "
                         r"to resume$", re.MULTILINE)
AT_ONCE = "fcmae-pretrain: interrupted: stopped at once, without saving; the checkpoints written before are kept"


class UnhandledCtrlC(Exception):
    """A SIGINT that no handler of the command took."""


@pytest.fixture
def ctrl_c_guard():
    """While a test runs, a SIGINT that the command does not handle fails that test (Python's own handler would
    raise KeyboardInterrupt and stop the whole pytest session). Yields the guard's handler."""

    def unhandled(signum, frame):  # noqa: ARG001 (signal handler signature)
        raise UnhandledCtrlC("SIGINT reached the test's handler: the command did not install its own")

    previous = signal.signal(signal.SIGINT, unhandled)
    try:
        yield unhandled
    finally:
        signal.signal(signal.SIGINT, previous)


def exit_code(main, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def ctrl_c_in_training_calls(monkeypatch, *calls):
    """SIGINT to this process during the given training forward passes (a call listed twice: two SIGINTs)."""
    real_build, count = main_pretrain.build_fcmae, {"n": 0}

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward = model.forward

        def forward_with_ctrl_c(imgs, mask=None):
            if model.training:
                count["n"] += 1
                for _ in range(calls.count(count["n"])):
                    os.kill(os.getpid(), signal.SIGINT)
            return forward(imgs, mask)

        model.forward = forward_with_ctrl_c
        return model

    monkeypatch.setattr(main_pretrain, "build_fcmae", build)
    return count


def records(out, kind):
    return [r for r in read_jsonl(Path(out) / "log.jsonl") if r["type"] == kind]


# ---------------------------------------------------------------- in-process: the exact moment
def test_ctrl_c_in_a_step_saves_says_so_once_and_exits_130(image_dir, tmp_path, monkeypatch, capsys, ctrl_c_guard):
    """(The resumed run's losses: test_ctrl_c_to_the_launcher_saves_and_the_same_command_ends_as_an_...)"""
    out = tmp_path / "out"
    calls = ctrl_c_in_training_calls(monkeypatch, 3)
    assert exit_code(main_pretrain.main, tiny_args(image_dir, out)) == 130
    text = capsys.readouterr()
    assert calls["n"] == 3, "the step after the Ctrl-C was trained"
    assert INTERRUPTED.findall(text.out) == [("1", "3", str(out))], text.out
    assert "stopped by" not in text.out and text.err == "", text.err
    saved = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert (saved["step"], saved["run_state"]["epoch"], saved["run_state"]["iteration"]) == (3, 0, 3)
    assert not (out / lock.LOCK_NAME).exists(), "the lock outlived the run"
    assert signal.getsignal(signal.SIGINT) is ctrl_c_guard, "the command left its SIGINT handler behind"


def test_a_second_ctrl_c_stops_at_once_in_one_line(image_dir, tmp_path, monkeypatch, capsys, ctrl_c_guard):
    """Two in the same step: the first would save after it, the second does not wait for that."""
    out = tmp_path / "out"
    calls = ctrl_c_in_training_calls(monkeypatch, 3, 3)
    assert exit_code(main_pretrain.main, tiny_args(image_dir, out)) == 130
    text = capsys.readouterr()
    assert calls["n"] == 3
    assert text.err.splitlines() == [AT_ONCE], text.err
    assert "Traceback" not in text.out and not INTERRUPTED.search(text.out)
    assert not (out / "checkpoint-last.pth").exists(), "saved although stopped at once"
    assert not (out / lock.LOCK_NAME).exists(), "the lock outlived the run"
    assert signal.getsignal(signal.SIGINT) is ctrl_c_guard


def test_ctrl_c_before_the_training_loop_stops_at_once(image_dir, tmp_path, monkeypatch, capsys, ctrl_c_guard):
    """Nothing to save yet (the data set is being read): no waiting for a first step."""
    real_build_dataset = main_pretrain.build_dataset

    def build_dataset(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_build_dataset(*args, **kwargs)

    monkeypatch.setattr(main_pretrain, "build_dataset", build_dataset)
    out = tmp_path / "out"
    assert exit_code(main_pretrain.main, tiny_args(image_dir, out)) == 130
    assert capsys.readouterr().err.splitlines() == [AT_ONCE]
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint-last.pth").exists()


def test_ctrl_c_in_fine_tuning_saves_and_exits_130(tmp_path, monkeypatch, capsys, ctrl_c_guard):
    data = tmp_path / "data"
    for split, count in (("train", 8), ("val", 2)):
        for seed, name in enumerate(("a", "b")):
            write_images(data / split / name, count, size=40, seed=seed)
    real_step, count = main_finetune.ClassificationStep, {"n": 0}

    class StepWithCtrlC(real_step):
        def __call__(self, model, batch):
            count["n"] += 1
            if count["n"] == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return super().__call__(model, batch)

    monkeypatch.setattr(main_finetune, "ClassificationStep", StepWithCtrlC)
    out = tmp_path / "out"
    argv = ["atto", "none", *TINY_ARGS, "--data_path", str(data), "--output_dir", str(out), "--input_size", "32",
            "--batch_size", "4", "--effective_batch", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--num_workers", "0", "--device", "cpu", "--amp", "off", "--print_every", "1", "--cpu_threads", "1",
            "--model_ema", "false"]
    assert exit_code(main_finetune.main, argv) == 130
    text = capsys.readouterr()
    assert INTERRUPTED.findall(text.out) == [("1", "2", str(out))] and text.err == "", text.out + text.err
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == 2
    assert records(out, "epoch") == [], "evaluated although interrupted in the epoch"


# ---------------------------------------------------------------- real processes, as a terminal sends it
def interrupt_group(proc, out, step):
    """Wait for optimizer step `step`, then SIGINT to the run's whole process group (a terminal's Ctrl-C)."""
    seen = wait_for_step(proc, out, step)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code, text = finish(proc)
    finally:
        try:  # whatever the run left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return seen, code, text


@pytest.mark.slow
def test_ctrl_c_to_the_launcher_saves_and_the_same_command_ends_as_an_uninterrupted_run(image_dir, tmp_path):
    """launch/pretrain.sh with loader workers; Ctrl-C mid-run, then the same command to the end: the final loss
    of an uninterrupted run, and every optimizer step logged once, at the same loss."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = lambda folder: tiny_args(image_dir, folder, epochs=4, num_workers=2)  # 24 optimizer steps
    assert main_pretrain.run(main_pretrain.resolve_config(args(ref))) == 0

    seen, code, text = interrupt_group(start_launcher(args(out), tmp_path, new_session=True), out, 2)
    assert code == 130, f"exit code {code}:\n{text[-3000:]}"
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    stops = INTERRUPTED.findall(text)
    assert len(stops) == 1 and stops[0][2] == str(out), text[-3000:]
    saved = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert seen <= saved["step"] == int(stops[0][1]) < 24, "not saved mid-run"

    code, text = finish(start_launcher(args(out), tmp_path, new_session=True))
    assert code == 0 and "resumed from" in text, text[-3000:]
    assert [(r["step"], r["loss"]) for r in records(out, "train")] == \
           [(r["step"], r["loss"]) for r in records(ref, "train")]
    assert [(r["epoch"], r["loss"]) for r in records(out, "epoch")] == \
           [(r["epoch"], r["loss"]) for r in records(ref, "epoch")]


@pytest.mark.slow
def test_ctrl_c_reaches_every_torchrun_rank_and_is_awaited(image_dir, tmp_path):
    """Two processes under torchrun: the launcher passes the Ctrl-C on, both ranks save together, torchrun
    reports no failure, and the launcher exits 130 once they are done."""
    out = tmp_path / "out"
    proc = _start(["env", "NPROC_PER_NODE=2", "bash", str(LAUNCH),
                   *map(str, tiny_args(image_dir, out, epochs=50, num_workers=1))], tmp_path, new_session=True)
    wait_for_step(proc, out, 2)
    training = training_processes(proc.pid)
    assert len(training) == 2, f"training processes under the launcher: {training}"
    _, code, text = interrupt_group(proc, out, 2)
    orphans = [p for p in training if alive(p)]
    assert not orphans, f"the launcher exited ({code}) and left the training running: pids {orphans}"
    assert code == 130, f"exit code {code}:\n{text[-3000:]}"
    assert len(INTERRUPTED.findall(text)) == 1, text[-3000:]
    for noise in ("Traceback", "exited with code", "failed (exitcode", "closing signal"):
        assert noise not in text, text[-3000:]
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["world_size"] == 2


@pytest.mark.slow
def test_ctrl_c_in_fcmae_knn_is_one_line_and_exit_130(tmp_path):
    """fcmae-knn has no checkpoint: Ctrl-C while it extracts features stops at once (loader workers too)."""
    data = make_folder(tmp_path / "data", per_class=(40, 10))  # 120 + 30 images at 224x224: seconds of work
    proc = subprocess.Popen([sys.executable, "-m", "finetune.knn", "none", "--data_path", str(data), "--device", "cpu",
                             "--num_workers", "2", "--batch_size", "8"], cwd=REPO,
                            env=single_process_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("data "):  # printed once the loaders are built, before any feature
                break
        time.sleep(0.2)  # the workers are up
        assert proc.poll() is None, "fcmae-knn ended before the Ctrl-C"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 130, f"exit code {proc.returncode}:\n{err[-3000:]}"
    assert err.strip().splitlines() == ["fcmae-knn: interrupted: stopped at once; nothing was saved"], err
    assert "knn    k=" not in out
