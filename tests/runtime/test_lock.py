"""The output folder's lock (fcmae.runtime.lock): one holder at a time, free as soon as its holder dies, clear
one-line errors (in use, full disk, no flock), and nothing left behind.

Two `OutputLock`s of one process open the lock file separately, so their flocks exclude each other as two
processes' do; the tests that need a process of their own (a killed holder) are marked slow.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import errors, files, lock
from tests.helpers import single_process_env, tiny_args, write_images
from tests.runtime.test_faults import full_disk_after

REPO = Path(__file__).resolve().parents[2]


def test_a_second_lock_is_refused_with_one_line_naming_the_holder_and_changes_nothing(tmp_path):
    folder = tmp_path / "out"
    held = lock.OutputLock(folder).acquire()
    try:
        recorded = (folder / lock.LOCK_NAME).read_text()
        with pytest.raises(errors.LockError) as refused:
            lock.OutputLock(folder).acquire()
        message = str(refused.value)
        assert f"{folder} is in use by another run (pid {os.getpid()} on {files.host_name()}" in message, message
        assert "\n" not in message and refused.value.exit_code == 5
        assert (folder / lock.LOCK_NAME).read_text() == recorded, "the refused run changed the holder's details"
        assert json.loads(recorded)["pid"] == os.getpid()
    finally:
        held.release()
    assert sorted(folder.iterdir()) == [], "the lock file outlived its holder"
    lock.OutputLock(folder).acquire().release()  # free again


def test_contending_takers_never_hold_the_lock_together(tmp_path):
    """Takers that keep taking and releasing it: at most one holds it at any moment (the removal of the file at
    release races the others' open, and must not let two through)."""
    folder, holders, most, taken = tmp_path / "out", [], [0], [0]
    guard = threading.Lock()
    start = threading.Barrier(6)

    def taker():
        start.wait()
        for _ in range(40):
            try:
                held = lock.OutputLock(folder).acquire()
            except errors.LockError:
                continue
            with guard:
                holders.append(1)
                most[0], taken[0] = max(most[0], len(holders)), taken[0] + 1
            time.sleep(0.001)
            with guard:
                holders.pop()
            held.release()

    threads = [threading.Thread(target=taker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1, f"{most[0]} takers held the lock at once"
    assert taken[0] >= 6
    assert not (folder / lock.LOCK_NAME).exists()


def test_a_taker_that_opened_the_file_just_before_its_holder_removed_it_does_not_get_the_lock_too(tmp_path):
    """The moment the threads above rarely hit, made to happen: `late` opens the lock file, then the holder
    ends (removing the file) and `third` takes a new one; `late`'s flock of the removed file must not count."""
    folder, others = tmp_path / "out", []
    first, late = lock.OutputLock(folder).acquire(), lock.OutputLock(folder)
    real_open = late._open

    def open_then_the_holder_ends_and_another_run_starts():
        fd = real_open()
        if not others:
            first.release()
            others.append(lock.OutputLock(folder).acquire())
        return fd

    late._open = open_then_the_holder_ends_and_another_run_starts
    try:
        with pytest.raises(errors.LockError, match=f"pid {os.getpid()} on "):
            late.acquire()
    finally:
        late.release()
        for held in others:
            held.release()
    assert others and not (folder / lock.LOCK_NAME).exists()


@pytest.mark.parametrize("left", ["details of another host", "empty"])
def test_a_lock_file_left_by_a_dead_run_is_taken_at_once(tmp_path, left):
    """Nothing holds the file's flock, so it is free, whatever host it names and however recently it was
    written."""
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / lock.LOCK_NAME
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "command": "fcmae-pretrain"})
                    if left != "empty" else "")
    held = lock.OutputLock(folder).acquire()
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        held.release()
    assert not path.exists()


HOLDER = """
import os, sys, time
from fcmae.runtime import lock
with lock.hold(sys.argv[1]):
    if os.fork() == 0:  # a child that outlives the holder, as a loader worker may
        time.sleep(120)
        os._exit(0)
    open(sys.argv[2], "w").close()
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_killed_holders_lock_is_free_at_once_even_while_its_forked_child_lives(tmp_path):
    folder, ready = tmp_path / "out", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ready)], cwd=REPO,
                              env=single_process_env(PYTHONPATH=str(REPO)))
    child = None
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
            time.sleep(0.05)
        with pytest.raises(errors.LockError, match=f"pid {holder.pid} on "):
            lock.OutputLock(folder).acquire()
        child = int(subprocess.run(["pgrep", "-P", str(holder.pid)], capture_output=True, text=True).stdout)
        holder.kill()
        holder.wait()
        assert files.pid_alive(child)
        lock.OutputLock(folder).acquire().release()  # at once: no waiting, no staleness rule
    finally:
        holder.kill()
        holder.wait()
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_a_full_disk_when_taking_the_lock_names_the_output_folder_and_leaves_nothing(tmp_path, monkeypatch,
                                                                                      capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    write_images(data / "train" / "a", 4)
    out.mkdir()  # a folder of the user's: kept whatever happens, so what the run leaves in it shows
    full_disk_after(monkeypatch, 1, lock.LOCK_NAME)
    monkeypatch.chdir(tmp_path / "data")  # a folder other than the output folder
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(data, out))
    err = capsys.readouterr().err
    assert exc.value.code == 4, err
    assert err.startswith(f"fcmae-pretrain: error: no space left on device in {out} while writing "
                          f"{lock.LOCK_NAME}: it needs about"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(out.iterdir()) == [], "the lock file (or another file) was left behind"


def test_a_file_system_without_flock_is_a_clear_error(tmp_path, monkeypatch):
    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    folder = tmp_path / "out"
    with pytest.raises(errors.LockError, match="does not support flock .* -o flock"):
        lock.OutputLock(folder).acquire()
    assert sorted(folder.iterdir()) == []
