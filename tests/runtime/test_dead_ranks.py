"""A dead launcher, a dead rank, a wedged step: the run ends them all, or restarts, on its own.

- no orphans: every training process and loader worker ends with the process that started it
  (fcmae.runtime.lifeline);
- the culprit: the launcher names the rank that failed first and how (fcmae.runtime.launch.torchrun), the
  others say in one line that they lost contact (fcmae.runtime.command);
- timed checkpoints (save_minutes), automatic restarts (max_restarts) and the hang watchdog (hang_minutes).

The process tests run the tiny model of tests/helpers.py through launch/pretrain.sh, one or two CPU
processes (gloo), and wait for log.jsonl to show a given optimizer step before they act.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fcmae.runtime import errors, lifeline
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.loader import train_loader
from fcmae.runtime.logs import read_jsonl
from fcmae.runtime.plan import make_plan
from tests import helpers
from tests.helpers import single_process_env, steps_logged, write_images

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "pretrain.sh"

# The tiny run: 16 images, 2 per rank and step (an effective batch of 4 on two ranks, 2 on one).
tiny_args = partial(helpers.tiny_args, decoder_dim=16, batch_size=2, vis_images=0, amp="off", cpu_threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dead_ranks_data")
    write_images(root / "train" / "a", 16, size=72)
    return root


def run_env(tmp_path, processes=1, **extra):
    return single_process_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FCMAE_CACHE=str(tmp_path / "cache"),
                              NPROC_PER_NODE=str(processes), FCMAE_DIST_TIMEOUT="60", **extra)


def start_launcher(args, tmp_path, processes=1, **env):
    """launch/pretrain.sh in a session of its own, its output in a file (a pipe would wait for orphans)."""
    log = tmp_path / f"launch-{len(list(tmp_path.glob('launch-*.log')))}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(LAUNCH), *map(str, args)], cwd=REPO,
                                env=run_env(tmp_path, processes, **env), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    return proc


def output(proc) -> str:
    return proc.log.read_text(errors="replace")


def wait_for_step(proc, out, step, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        steps = steps_logged(out)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before step {step}:\n{output(proc)[-3000:]}")
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s:\n{output(proc)[-3000:]}"
        time.sleep(0.05)


def finish(proc, timeout=180):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"still running after {timeout} s:\n{output(proc)[-3000:]}")
    return proc.returncode, output(proc)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def descendants(pid):
    """Every process below `pid` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in Path(f"/proc/{p}/task").iterdir() for c in (t / "children").read_text().split()]
        except OSError:
            kids = []
        found.extend(kids)
        todo.extend(kids)
    return found


def alive(pid) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def command_of(pid) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def training_pids(proc):
    """The training processes under the launcher (not torchrun, not loader workers): one per rank."""
    launchers = ("fcmae.runtime.launch", "torch.distributed.run")
    pids = [p for p in descendants(proc.pid)
            if "-m fcmae.pretrain.main" in command_of(p) and not any(n in command_of(p) for n in launchers)]
    return [p for p in pids if not any(p in descendants(q) for q in pids)]


def wait_until_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


# ---------------------------------------------------------------- no orphans
SLEEP_WITH_PARENT = """
import sys, time
from fcmae.runtime.lifeline import die_with_parent
assert die_with_parent()
print("ready", flush=True)
time.sleep(120)
"""

PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
"""


@pytest.mark.slow
def test_a_process_that_asked_to_die_with_its_parent_ends_when_the_parent_ends(tmp_path):
    parent = subprocess.run([sys.executable, "-c", PARENT, SLEEP_WITH_PARENT], cwd=REPO, capture_output=True,
                            text=True, env=single_process_env(PYTHONPATH=str(REPO)), timeout=60)
    assert parent.returncode == 0, parent.stderr
    child = int(parent.stdout.strip())
    left = wait_until_gone([child], 5)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "the child outlived its parent"


def test_a_command_started_by_hand_does_not_tie_itself_to_its_shell():
    """Without FCMAE_PARENT_PID (a shell, nohup, srun) nothing is asked of the kernel."""
    assert lifeline.die_with_launcher({}) is False
    assert lifeline.die_with_launcher({lifeline.PARENT_VARIABLE: ""}) is False


class _DeathSignal(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return lifeline.parent_death_signal()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_loader_workers_end_with_their_training_process():
    settings = SimpleNamespace(batch_size=1, effective_batch=1, update_freq=None, blr=1e-3, lr=None, epochs=1,
                               warmup_epochs=0)
    loader = train_loader(_DeathSignal(), make_plan(settings, 1, 2), num_workers=1, seed=0, info=DistInfo())
    assert [int(x) for x in loader] == [signal.SIGKILL, signal.SIGKILL]


ERROR_IN_THE_LOOP = """
import sys
from types import SimpleNamespace
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.loader import train_loader
from fcmae.runtime.plan import make_plan
class BadData:
    def __len__(self):
        return 8

    def __getitem__(self, index):
        raise ValueError("bad data")  # raised again in the main process, its traceback holding the iterator


settings = SimpleNamespace(batch_size=1, effective_batch=1, update_freq=None, blr=1e-3, lr=None, epochs=1,
                           warmup_epochs=0)
loader = train_loader(BadData(), make_plan(settings, 1, 8), num_workers=2, seed=0, info=DistInfo())
try:
    for batch in loader:
        pass
except ValueError as error:
    kept = error
    print("error: bad data", flush=True)
    sys.exit(2)
"""


@pytest.mark.slow
def test_a_process_that_exits_with_its_loader_workers_running_does_not_wait_for_them():
    """Workers ignore SIGTERM, which is how Python's exit ends daemonic children: the exit used to hang."""
    done = subprocess.run([sys.executable, "-c", ERROR_IN_THE_LOOP], cwd=REPO, capture_output=True, text=True,
                          env=single_process_env(PYTHONPATH=str(REPO)), timeout=60)
    assert done.returncode == 2 and done.stdout.strip() == "error: bad data", done.stderr
    assert "killed by signal" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("processes, restarts", [(1, 0), (2, 0), (1, 1)], ids=["python", "torchrun", "restarts"])
def test_sigkill_of_the_launchers_process_group_leaves_no_process(data, tmp_path, processes, restarts):
    """torchrun starts ranks in sessions of their own, and so does the restart loop its one training process:
    a SIGKILL of the launcher's group must still end them."""
    out = tmp_path / "out"
    args = tiny_args(data, out, "--max_restarts", restarts, epochs=50, num_workers=1)
    proc = start_launcher(args, tmp_path, processes)
    try:
        wait_for_step(proc, out, 2)
        below = descendants(proc.pid)
        assert len(training_pids(proc)) == processes, [command_of(p) for p in below]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        left = wait_until_gone([proc.pid, *below], 20)
    finally:
        kill_group(proc)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"alive 20 s after the SIGKILL: {[command_of(p) for p in left]}"


def rank_pid(proc, rank):
    """The pid of training rank `rank` under the launcher (its RANK variable)."""
    for pid in training_pids(proc):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    pytest.fail(f"no rank {rank} under the launcher:\n{output(proc)[-3000:]}")


# ---------------------------------------------------------------- the culprit
def failure(exitcode, timestamp):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    found = ProcessFailure(local_rank=0, pid=10, exitcode=exitcode, error_file="<N/A>")
    found.timestamp = timestamp
    return found


LOST = errors.LostContactError.exit_code
CULPRITS = {
    # rank -> (exit code, timestamp), in the order torchrun saw them; the rank the launcher must name
    "killed, its peer lost contact": ({0: (LOST, 100), 1: (-9, 100)}, 1),
    "killed, its peer stopped by torchrun": ({0: (-15, 100), 1: (-9, 100)}, 1),
    "an agreed error, then an abort while exiting": ({0: (2, 101), 1: (-6, 100)}, 0),
    "a crash, its peer lost contact": ({1: (LOST, 100), 0: (1, 100)}, 0),
    "killed, then its peer killed by torchrun 30 s later": ({0: (-9, 130), 1: (-9, 100)}, 1),
    "both killed in one poll: the first seen": ({1: (-9, 100), 0: (-9, 100)}, 1),
    "both hung": ({0: (errors.HangError.exit_code, 101), 1: (errors.HangError.exit_code, 100)}, 1),
}


@pytest.mark.parametrize("case", sorted(CULPRITS))
def test_the_launcher_names_the_rank_that_failed_first(case):
    from fcmae.runtime.launch import torchrun

    seen, expected = CULPRITS[case]
    assert torchrun.culprit({rank: failure(*what) for rank, what in seen.items()}) == expected


def test_a_rank_killed_by_a_signal_is_named_with_the_signal():
    from fcmae.runtime.launch import torchrun

    assert torchrun.describe(1, -9) == ("rank 1 was killed by SIGKILL (signal 9)", 137)
    assert torchrun.describe(0, 3) == ("rank 0 exited with code 3", 3)


def test_the_culprit_is_reported_for_the_launcher(monkeypatch, tmp_path, capsys):
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from fcmae.runtime.launch import torchrun

    def failing_run(args):
        raise ChildFailedError("fcmae.pretrain.main", {0: failure(LOST, 100), 1: failure(-9, 100)})

    monkeypatch.setattr(torch.distributed.run, "run", failing_run)
    monkeypatch.setenv(torchrun.REPORT_VARIABLE, str(tmp_path / "report.json"))
    with pytest.raises(SystemExit) as e:
        torchrun.main(["--standalone", "--nproc_per_node", "2", "-m", "fcmae.pretrain.main"])
    assert e.value.code == 137
    assert capsys.readouterr().err.strip() == ("launch: rank 1 was killed by SIGKILL (signal 9); the other ranks "
                                               "were stopped")
    assert json.loads((tmp_path / "report.json").read_text()) == {
        "rank": 1, "exit_code": 137, "cause": "rank 1 was killed by SIGKILL (signal 9)"}


@pytest.mark.parametrize("message, reason", [
    ("[/x/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:56455: Connection reset by peer. This is "
     "typically caused by a remote worker hanging", "connection reset by peer"),
    ("[/x/gloo/transport/tcp/pair.cc:589] Connection closed by peer [10.0.0.2]:4242", "connection closed by peer"),
    ("[/x/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation to complete",
     "no answer within 20000 ms"),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, NCCL "
     "version 2.21.5", "NCCL: a remote process exited or the network failed"),
])
def test_a_broken_collective_is_lost_contact(message, reason):
    from fcmae.runtime.distributed import lost_contact

    assert lost_contact(RuntimeError(message)) == reason
    try:  # also where it is the cause of another error
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("while saving") from inner
    except ValueError as outer:
        assert lost_contact(outer) == reason


def test_other_errors_are_not_lost_contact():
    from fcmae.runtime.distributed import lost_contact

    assert lost_contact(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert lost_contact(ValueError("connection reset by peer")) is None  # not a transport's error type


@pytest.mark.slow
def test_a_killed_rank_is_named_and_its_peer_says_one_line(data, tmp_path):
    out = tmp_path / "out"
    proc = start_launcher(tiny_args(data, out, epochs=50, num_workers=1), tmp_path, processes=2)
    try:
        wait_for_step(proc, out, 3)
        os.kill(rank_pid(proc, 1), signal.SIGKILL)
        code, text = finish(proc, 60)
    finally:
        kill_group(proc)
    assert code == 128 + signal.SIGKILL, f"exit code {code}:\n{text[-3000:]}"
    lines = text.strip().splitlines()
    assert lines[-1] == "launch: rank 1 was killed by SIGKILL (signal 9); the other ranks were stopped", text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    said = [line for line in lines if line.startswith("fcmae-pretrain: error:")]
    # rank 0 breaks in its next collective (also when torchrun's SIGTERM came first: its stop needs one)
    assert len(said) == 1, said
    assert said[0].startswith("fcmae-pretrain: error: rank 0: lost contact with another rank ("), said
    assert said[0].endswith("); stopping"), said


@pytest.mark.slow
def test_a_stop_signal_to_the_launcher_is_not_restarted(data, tmp_path):
    """Under the restart loop SIGTERM still reaches the training, which saves and ends: no restart follows."""
    out = tmp_path / "out"
    proc = start_launcher(tiny_args(data, out, "--max_restarts", 2, epochs=50, num_workers=1), tmp_path)
    try:
        wait_for_step(proc, out, 2)
        proc.send_signal(signal.SIGTERM)
        code, text = finish(proc, 60)
    finally:
        kill_group(proc)
    assert code == 0, text[-3000:]
    assert text.count("stopped by SIGTERM") == 1 and "restart 1" not in text, text[-3000:]
    assert not restart_records(out)


# ---------------------------------------------------------------- timed checkpoints
def test_a_timed_checkpoint_is_due_minutes_after_the_last_checkpoint():
    from fcmae.runtime.timed_saves import SaveClock

    now = [100.0]
    clock = SaveClock(0.5, now=lambda: now[0])
    now[0] += 29
    assert not clock.due()
    now[0] += 1
    assert clock.due()
    clock.saved()  # any checkpoint, an epoch's too
    assert not clock.due()
    now[0] += 30
    assert clock.due()
    assert not SaveClock(None, now=lambda: now[0] + 1e9).due()


def test_a_host_snapshot_is_a_copy_taken_into_the_same_buffers_each_time():
    from fcmae.runtime.timed_saves import HostSnapshot

    weights = torch.ones(3)
    state = {"model": {"w": weights}, "optimizer": {"state": [(torch.zeros(2), 5)]}, "epoch": 1}
    snapshot = HostSnapshot()
    first = snapshot.take(state)
    weights.add_(1)  # training goes on
    assert first["model"]["w"].tolist() == [1, 1, 1] and first["optimizer"]["state"][0][1] == 5
    assert first["epoch"] == 1 and isinstance(first["optimizer"]["state"][0], tuple)
    second = snapshot.take(state)
    assert second["model"]["w"].tolist() == [2, 2, 2]
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # no new allocation


def test_the_background_writer_runs_one_write_at_a_time_and_keeps_its_error():
    from fcmae.runtime.timed_saves import BackgroundWriter

    events, writer = [], BackgroundWriter()

    def slow():
        time.sleep(0.3)
        events.append("first written")

    writer.start(slow)
    writer.start(lambda: events.append("second started"))  # waits for the first
    assert writer.wait() is None
    assert events == ["first written", "second started"]

    def full():
        raise errors.DiskFullError(28, "no space left on device in /out while writing checkpoint-last.pth")

    writer.start(full)
    time.sleep(0.1)
    failed = writer.failure()
    assert isinstance(failed, errors.DiskFullError) and "no space left" in str(failed)
    assert writer.failure() is None  # reported once


def test_every_rank_learns_at_a_step_boundary_that_a_timed_checkpoint_is_due():
    from fcmae.runtime.resume import RunState
    from fcmae.runtime.signals import StopRequest
    from fcmae.runtime.stepping import StopAgreement

    agreement, state = StopAgreement(DistInfo(), StopRequest()), RunState()
    agreement.save_due = lambda: True
    assert agreement.check(state, 0, boundary=False) is False and not agreement.save_now  # mid-accumulation
    agreement.record(torch.tensor(1.0), 0, 1, 1)
    assert agreement.check(state, 1, boundary=True) is False and agreement.save_now
    agreement.save_due = lambda: False
    agreement.check(state, 2, boundary=True)
    assert not agreement.save_now


def test_a_full_disk_agreed_on_by_the_ranks_keeps_its_message():
    """The ranks raise one rank's error again from its message alone (fcmae.runtime.stepping.StopAgreement)."""
    error = errors.DiskFullError(28, "no space left on device in /out while writing checkpoint-last.pth")
    agreed = type(error)(f"rank 0 of 2: {error}")
    assert str(agreed) == "rank 0 of 2: no space left on device in /out while writing checkpoint-last.pth"


@pytest.fixture(scope="module")
def reference_losses(data, tmp_path_factory):
    """(step, loss) of an uninterrupted one-process run: 2 epochs of 4 optimizer steps of 2 iterations."""
    from fcmae.pretrain import main as main_pretrain

    out = tmp_path_factory.mktemp("reference") / "out"
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(data, out))) == 0
    return train_losses(out)


def train_losses(out):
    return [(r["step"], r["loss"]) for r in read_jsonl(Path(out) / "log.jsonl") if r["type"] == "train"]


def newest_checkpoint_state(out):
    from fcmae.runtime import checkpoint as ckpt

    path = ckpt.find_latest_checkpoint(out)
    try:
        return None if path is None else ckpt.load_checkpoint(path)["run_state"]
    except errors.CheckpointError:  # replaced while read
        return None


@pytest.mark.slow
def test_a_sigkill_after_a_timed_checkpoint_resumes_exactly(data, tmp_path, reference_losses):
    """Killed mid-epoch: the run resumes from the timed checkpoint (mid-epoch, at a step boundary) and
    reproduces the uninterrupted run's losses."""
    from fcmae.pretrain import main as main_pretrain

    out = tmp_path / "out"
    proc = start_launcher(tiny_args(data, out, "--save_minutes", "0.0001"), tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            state = newest_checkpoint_state(out)
            if state is not None and 0 < state["iteration"] < 8:
                break
            assert proc.poll() is None and time.monotonic() < deadline, output(proc)[-3000:]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # one process: the launcher became the training (exec)
    finally:
        kill_group(proc)
    state = newest_checkpoint_state(out)
    assert state["epoch"] * 4 + state["iteration"] // 2 == state["step"] and state["iteration"] % 2 == 0, state
    assert "timed checkpoint at epoch" in output(proc)
    assert main_pretrain.run(main_pretrain.resolve_config(tiny_args(data, out, "--save_minutes", "0.0001"))) == 0
    assert train_losses(out) == reference_losses


@pytest.mark.slow
def test_a_full_disk_in_a_background_write_stops_the_run_with_one_line(data, tmp_path, monkeypatch, capsys):
    from fcmae.pretrain import main as main_pretrain
    from fcmae.runtime import files

    real_flush = files.flush_to_disk

    def flush(f):
        if Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name.startswith(".checkpoint-last.pth."):
            raise OSError(28, "No space left on device")
        real_flush(f)

    monkeypatch.setattr(files, "flush_to_disk", flush)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(data, out, "--save_minutes", "0.000001"))
    err = capsys.readouterr().err
    assert exc.value.code == 4, err
    assert "no space left on device" in err and "checkpoint-last.pth" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (out / "checkpoint-last.pth").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"


# ---------------------------------------------------------------- automatic restarts
@pytest.mark.parametrize("code, restart", [(1, True), (6, True), (7, True), (137, True), (139, True), (0, False),
                                           (2, False), (3, False), (4, False), (5, False), (130, False),
                                           (143, False)])
def test_a_restart_follows_failures_that_a_restart_can_mend(code, restart):
    from fcmae.runtime.launch.restarts import restartable

    assert restartable(code) is restart


def test_a_restart_resumes_what_this_launch_saved(tmp_path):
    from fcmae.runtime.launch.restarts import resume_args

    args = ["atto", "demo", "--resume", "none"]
    assert resume_args(args, None, tmp_path, since=time.time()) == args  # nothing saved: start as before
    (tmp_path / "checkpoint-last.pth").write_bytes(b"old")
    assert resume_args(args, None, tmp_path, since=time.time() + 60) == args  # an older run's checkpoint
    assert resume_args(args, None, tmp_path, since=time.time() - 60) == [*args, "--resume", "auto"]
    assert resume_args(["atto", "demo"], "auto", tmp_path, since=0) == ["atto", "demo"]


def scripted_runs(codes, reports=None):
    """A stand-in for Supervisor.run that ends with the next of `codes` (and writes torchrun's report)."""
    seen = []

    def run(argv, env):
        seen.append(list(argv))
        code = codes[len(seen) - 1]
        report = (reports or {}).get(len(seen) - 1)
        if report:
            Path(env["FCMAE_FAILURE_REPORT"]).write_text(json.dumps(report))
        return code

    return run, seen


def restart_records(out):
    path = Path(out) / "log.jsonl"
    return [r for r in read_jsonl(path) if r["type"] == "restart"] if path.exists() else []


def test_the_launcher_restarts_until_the_run_ends_and_logs_each_restart(tmp_path, capsys):
    from fcmae.runtime.launch.restarts import run_with_restarts

    culprit = {"rank": 1, "exit_code": 137, "cause": "rank 1 was killed by SIGKILL (signal 9)"}
    run, seen = scripted_runs([137, 7, 0], {0: culprit})
    code = run_with_restarts(run, lambda args: ["cmd", *args], ["a"], {}, "torchrun", 2, tmp_path, "auto",
                             lambda: False)
    assert code == 0 and seen == [["cmd", "a"]] * 3
    records = restart_records(tmp_path)
    assert [(r["restart"], r["exit_code"], r["cause"]) for r in records] == [
        (1, 137, "rank 1 was killed by SIGKILL (signal 9)"), (2, 7, "torchrun exited with code 7")]
    err = capsys.readouterr().err
    assert "launch: rank 1 was killed by SIGKILL (signal 9); restart 1 of 2, resuming from the start" in err


@pytest.mark.parametrize("codes, stopped, expected_runs", [
    ([3, 0], False, 1),  # a non-finite loss: never restarted
    ([137, 137, 137], False, 3),  # two restarts, then the run ends
    ([137, 0], True, 1),  # the launcher was asked to stop
])
def test_the_launcher_does_not_restart_what_it_should_not(tmp_path, capsys, codes, stopped, expected_runs):
    from fcmae.runtime.launch.restarts import run_with_restarts

    run, seen = scripted_runs(codes)
    code = run_with_restarts(run, list, [], {}, "python", 2, tmp_path, "auto", lambda: stopped)
    assert len(seen) == expected_runs and code == codes[expected_runs - 1]
    assert len(restart_records(tmp_path)) == expected_runs - 1
    if expected_runs == 3:
        assert "the training process was killed by SIGKILL (signal 9); all 2 restart(s) used" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_training_process_is_restarted_and_ends_as_an_uninterrupted_run(data, tmp_path, reference_losses):
    """One process under the restart loop: SIGKILL the training, the launcher starts it again from its
    checkpoint, the run ends by itself with the uninterrupted run's losses."""
    out = tmp_path / "out"
    proc = start_launcher(tiny_args(data, out, "--save_minutes", "0.0001", "--max_restarts", "1"), tmp_path)
    try:
        wait_for_step(proc, out, 2)
        [training] = training_pids(proc)
        os.kill(training, signal.SIGKILL)
        code, text = finish(proc)
    finally:
        kill_group(proc)
    assert code == 0, text[-3000:]
    assert "launch: the training process was killed by SIGKILL (signal 9); restart 1 of 1" in text, text[-3000:]
    [record] = restart_records(out)
    assert record["exit_code"] == 137 and record["checkpoint"] == "checkpoint-last.pth", record
    assert train_losses(out) == reference_losses


@pytest.mark.slow
def test_a_deterministic_failure_is_not_restarted(data, tmp_path):
    """Too many unreadable images on one rank (exit 2): restarting would only fail again."""
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    for i in range(6):
        (bad / "train" / "a" / f"zero_{i}.png").write_bytes(b"")
    proc = start_launcher(tiny_args(bad, tmp_path / "out", "--max_bad_fraction", "0.1", "--max_restarts", "2"),
                          tmp_path, processes=2)
    code, text = finish(proc)
    assert code == 2, text[-3000:]
    assert "restart 1" not in text and not restart_records(tmp_path / "out"), text[-3000:]
    last = text.strip().splitlines()[-1]  # both ranks stop with the agreed error: either may be named
    assert last.startswith("launch: rank ") and last.endswith(" exited with code 2; the other ranks were stopped"), last


@pytest.fixture(scope="module")
def two_rank_reference(data, tmp_path_factory):
    """(step, loss) of an uninterrupted two-rank run of 12 epochs (48 optimizer steps) through the launcher."""
    tmp = tmp_path_factory.mktemp("two_rank_reference")
    proc = start_launcher(tiny_args(data, tmp / "out", epochs=12, num_workers=1), tmp, processes=2)
    code, text = finish(proc)
    assert code == 0, text[-3000:]
    return train_losses(tmp / "out")


@pytest.mark.slow
def test_a_rank_killed_after_a_timed_checkpoint_is_restarted_and_the_run_ends_as_an_uninterrupted_one(
        data, tmp_path, two_rank_reference):
    """`NPROC_PER_NODE=2 launch/pretrain.sh ... --save_minutes 0.0015 --max_restarts 2` (a timed checkpoint every
    0.09 s; an epoch of 4 steps takes 0.2-0.5 s, so timed checkpoints fall mid-epoch), rank 1 SIGKILLed after its
    first timed checkpoint: the run ends by itself with exit 0 and the uninterrupted run's losses."""
    out = tmp_path / "out"
    proc = start_launcher(tiny_args(data, out, "--save_minutes", "0.0015", "--max_restarts", "2", epochs=12,
                                    num_workers=1), tmp_path, processes=2)
    try:
        deadline = time.monotonic() + 120
        while "timed checkpoint at epoch" not in output(proc):
            assert proc.poll() is None and time.monotonic() < deadline, output(proc)[-3000:]
            time.sleep(0.05)
        os.kill(rank_pid(proc, 1), signal.SIGKILL)
        code, text = finish(proc, 300)
    finally:
        kill_group(proc)
    assert code == 0, text[-3000:]
    assert "launch: rank 1 was killed by SIGKILL (signal 9); restart 1 of 2, resuming from" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    [record] = restart_records(out)
    assert (record["exit_code"], record["cause"]) == (137, "rank 1 was killed by SIGKILL (signal 9)"), record
    losses = train_losses(out)
    assert losses == two_rank_reference, "the restarted run's losses differ from the uninterrupted run's"
    assert losses[-1][0] == 48


# ---------------------------------------------------------------- the hang watchdog
def test_the_watchdog_writes_the_stacks_and_exits_6_when_no_step_comes(tmp_path, monkeypatch):
    import threading

    from fcmae.runtime import watchdog as hang
    from fcmae.runtime.watchdog import HangWatchdog

    monkeypatch.setattr(hang, "FIRED", threading.Event())  # this process goes on: its flag stays unset
    exits = []
    watchdog = HangWatchdog(0.002, tmp_path, rank=3, grace_s=0, exit=exits.append).start()  # 0.12 s
    try:
        for _ in range(10):  # steps keep it quiet
            time.sleep(0.03)
            watchdog.beat()
        assert exits == []
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.02)  # a wedged step: this test's own frame is in the stacks
    finally:
        watchdog.stop()
    assert exits == [errors.HangError.exit_code] and hang.FIRED.is_set()
    stacks = (tmp_path / "stacks-rank3.txt").read_text()
    assert "test_the_watchdog_writes_the_stacks_and_exits_6_when_no_step_comes" in stacks, stacks


def test_without_hang_minutes_there_is_no_watchdog(tmp_path):
    from fcmae.runtime.watchdog import HangWatchdog

    watchdog = HangWatchdog(None, tmp_path, rank=0, exit=lambda code: pytest.fail("fired"))
    watchdog.start()
    assert watchdog._thread is None
    watchdog.stop()


def rank_results(args, tmp_path, scenario, timeout=120):
    from tests.runtime.test_ranks import run_ranks

    return run_ranks(args, tmp_path, scenario, timeout=timeout)


@pytest.mark.slow
def test_a_rank_that_stops_stepping_makes_every_rank_write_its_stacks_and_exit(data, tmp_path):
    """Rank 1 sleeps after its 3rd step; rank 0 waits for it in a collective (process group timeout: 20 s). With
    hang_minutes 0.05 (3 s) both write their stacks and end, rank 1 with exit code 6."""
    out = tmp_path / "out"
    started = time.monotonic()
    results, _ = rank_results(tiny_args(data, out, "--hang_minutes", "0.05", epochs=50), tmp_path,
                              "sleep_on_rank_1")
    took = time.monotonic() - started
    codes = [code for code, _ in results]
    assert codes[1] == errors.HangError.exit_code and codes[0] in (6, 7), [text[-2000:] for _, text in results]
    for rank, (_, text) in enumerate(results):
        said = [line for line in text.splitlines() if "error" in line or "hang watchdog" in line]
        assert len(said) == 1 and said[0].startswith(f"hang watchdog: rank {rank}: no training step for 0.05 "
                                                     "minutes (hang_minutes)"), said
        assert "Traceback" not in text, text[-3000:]
    stacks = [(out / f"stacks-rank{rank}.txt").read_text() for rank in range(2)]
    assert "rank_child.py" in stacks[1] and "in optimizer_step" in stacks[1], stacks[1]  # where rank 1 sleeps
    assert "in train_one_epoch" in stacks[0], stacks[0]  # rank 0 waits in its loop
    assert took < 60, f"took {took:.0f} s"


# ---------------------------------------------------------------- rank 0 failing before the first collective
@pytest.mark.slow
def test_rank_0_failing_to_lock_the_folder_stops_every_rank_at_once(data, tmp_path):
    from fcmae.runtime import lock

    out = tmp_path / "out"
    out.mkdir()
    held = lock.OutputLock(out).acquire()  # another run holds the folder
    try:
        results, spread = rank_results(tiny_args(data, out), tmp_path, "none")
    finally:
        held.release()
    lines = [text.strip().splitlines()[-1] for _, text in results]
    assert [code for code, _ in results] == [5, 5], [text[-2000:] for _, text in results]
    assert lines[0] == lines[1] and lines[0].startswith("fcmae-pretrain: error: rank 0: "), lines
    assert spread < 10, f"the ranks stopped {spread:.0f} s apart: one waited for the other"


@pytest.mark.slow
def test_rank_0_failing_on_its_data_stops_every_rank_at_once(data, tmp_path):
    """The data folder is gone when the ranks start (rank 0 looks at it first)."""
    results, spread = rank_results(tiny_args(tmp_path / "gone", tmp_path / "out"), tmp_path, "none")
    lines = [text.strip().splitlines()[-1] for _, text in results]
    assert [code for code, _ in results] == [2, 2], [text[-2000:] for _, text in results]
    assert lines[0] == lines[1] and lines[0].startswith("fcmae-pretrain: error: rank 0: "), lines
    assert spread < 10, f"the ranks stopped {spread:.0f} s apart: one waited for the other"


def test_torchrun_called_in_process_leaves_no_parent_pid_behind(monkeypatch):
    """The ranks' FCMAE_PARENT_PID must not outlive torchrun.main: a process that later starts training (an
    sbatch from the same shell or test session) would take a stranger's pid for its parent and end at once."""
    import torch.distributed.run

    from fcmae.runtime.launch import torchrun
    from fcmae.runtime.lifeline import PARENT_VARIABLE

    monkeypatch.delenv(PARENT_VARIABLE, raising=False)
    seen = []
    monkeypatch.setattr(torch.distributed.run, "run", lambda args: seen.append(os.environ.get(PARENT_VARIABLE)))
    torchrun.main(["--standalone", "--nproc_per_node", "1", "-m", "fcmae.pretrain.main"])
    assert seen == [str(os.getpid())]
    assert PARENT_VARIABLE not in os.environ
