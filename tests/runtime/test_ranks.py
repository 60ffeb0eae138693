"""Two ranks on gloo (CPU): failures one rank meets alone end every rank, one resume decision.

Each rank is a `python -m tests.rank_child` process with torchrun's
variables and FCMAE_DIST_TIMEOUT=20, so a rank left waiting in a collective
fails within 20 s instead of 30 minutes. The runs are tiny: 16 images,
2 images per rank and step, 4 steps per epoch.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.logs import read_jsonl
from tests import helpers
from tests.helpers import single_process_env, write_images

pytestmark = pytest.mark.slow  # every test starts rank processes or the launcher

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT_S = 20  # the process group's timeout in these runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks_data")
    write_images(root / "train" / "a", 16, size=72)
    return root


# The shared tiny run, 2 images per rank and step (an effective batch of 4 over 2 ranks).
tiny_args = partial(helpers.tiny_args, decoder_dim=16, batch_size=2, vis_images=0, amp="off", cpu_threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(tmp_path: Path) -> dict:
    return single_process_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FCMAE_CACHE=str(tmp_path / "cache"),
                              FCMAE_DIST_TIMEOUT=str(TIMEOUT_S))


def run_ranks(args, tmp_path, scenario="none", env=None, timeout=90):
    """Run the pre-training command as WORLD ranks.

    Returns [(exit code, output)] per rank, and the seconds between the first and the last rank's exit
    (a rank left waiting in a collective would take the process group's timeout, TIMEOUT_S, longer).
    """
    port, procs = free_port(), []
    for rank in range(WORLD):
        rank_env = {**base_env(tmp_path), **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(WORLD),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = tmp_path / f"{scenario}-rank{rank}-{len(list(tmp_path.glob('*.log')))}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "tests.rank_child", scenario, "fcmae.pretrain.main",
                                     *map(str, args)], cwd=REPO, env=rank_env, stdout=f, stderr=subprocess.STDOUT)
        procs.append((proc, log))
    deadline, ended = time.monotonic() + timeout, {}
    while len(ended) < WORLD:
        for rank, (proc, _) in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.monotonic()
        if time.monotonic() > deadline:
            for proc, _ in procs:
                proc.kill()
                proc.wait()
            pytest.fail(f"still running after {timeout} s:\n" + "\n".join(
                f"--- rank {r}:\n{log.read_text()[-2000:]}" for r, (_, log) in enumerate(procs)))
        time.sleep(0.05)
    results = [(proc.returncode, log.read_text(errors="replace")) for proc, log in procs]
    return results, max(ended.values()) - min(ended.values())


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def epoch_losses(out):
    return [r["loss"] for r in read_jsonl(Path(out) / "log.jsonl") if r["type"] == "epoch"]


# ---------------------------------------------------------------- a failure on one rank ends every rank
def test_nan_loss_on_one_rank_stops_every_rank_with_one_message(data, tmp_path):
    results, spread = run_ranks(tiny_args(data, tmp_path / "out"), tmp_path, "nan_on_rank_1")
    lines = [last_line(text) for _, text in results]
    for rank, (code, text) in enumerate(results):
        assert code == 3, f"rank {rank} exited with {code}:\n{text[-3000:]}"
        assert "Traceback" not in text, text[-3000:]
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("fcmae-pretrain: error: rank 1 of 2: loss is nan at epoch 2, iteration 1 "
                               "(optimizer step 6)"), lines[0]
    assert "checkpoint-last.pth" in lines[0]  # the last good checkpoint (epoch 1) is named
    assert ckpt.load_checkpoint(tmp_path / "out" / "checkpoint-last.pth")["step"] == 4
    assert spread < TIMEOUT_S / 2, f"the ranks stopped {spread:.0f} s apart: one waited for the other"


def test_unreadable_images_on_one_rank_stop_every_rank_with_one_message(data, tmp_path):
    args = tiny_args(data, tmp_path / "out", "--max_bad_fraction", "0.1")  # at most 1 of 16
    results, spread = run_ranks(args, tmp_path, "unreadable_on_rank_1")
    lines = [last_line(text) for _, text in results]
    for rank, (code, text) in enumerate(results):
        assert code == 2, f"rank {rank} exited with {code}:\n{text[-3000:]}"
        assert "Traceback" not in text, text[-3000:]
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("fcmae-pretrain: error: rank 1 of 2: ") and " of 16 images are unreadable" in lines[0]
    assert "skipping unreadable image" in results[1][1] and "skipping unreadable image" not in results[0][1]
    assert spread < TIMEOUT_S / 2, f"the ranks stopped {spread:.0f} s apart: one waited for the other"


def test_a_signal_to_one_rank_stops_every_rank_and_rank_0_names_it(data, tmp_path):
    """SIGTERM to rank 1 alone (after its 2nd optimizer step): both ranks save at the same step and exit 0, and
    rank 0's line names the signal and where it came, not exit_after_steps."""
    results, _ = run_ranks(tiny_args(data, tmp_path / "out", epochs=50), tmp_path, "sigterm_on_rank_1")
    for rank, (code, text) in enumerate(results):
        assert code == 0 and "Traceback" not in text, f"rank {rank} exited with {code}:\n{text[-3000:]}"
    text = results[0][1]
    assert "stopped by SIGTERM on another rank at epoch 1" in text, text[-3000:]
    assert "exit_after_steps" not in text, text[-3000:]
    assert ckpt.load_checkpoint(tmp_path / "out" / "checkpoint-last.pth")["step"] == 2


# ---------------------------------------------------------------- one resume decision
@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """An uninterrupted 2-rank, 2-epoch run."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    results, _ = run_ranks(tiny_args(data, tmp / "out"), tmp)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    return tmp / "out"


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """A 2-rank run stopped after 2 optimizer steps (mid-epoch 1); its folder is copied by the tests."""
    tmp = tmp_path_factory.mktemp("stopped")
    results, _ = run_ranks(tiny_args(data, tmp / "out", "--exit_after_steps", "2"), tmp)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert ckpt.load_checkpoint(tmp / "out" / "checkpoint-last.pth")["step"] == 2
    return tmp / "out"


def test_ranks_resume_the_checkpoint_rank_0_picks_and_their_own_epoch_loss(data, tmp_path, stopped, uninterrupted):
    """Rank 1 lists a newer checkpoint (uninterrupted's epoch 1, step 4); both resume rank 0's (step 2)."""
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    other = uninterrupted / "checkpoint-0001.pth"
    assert ckpt.load_checkpoint(other)["step"] == 4
    results, _ = run_ranks(tiny_args(data, out), tmp_path, "stale_listing_on_rank_1",
                           env={"FCMAE_TEST_OTHER_CHECKPOINT": str(other)})
    for rank, (code, text) in enumerate(results):
        assert f"rank {rank} restored step 2 from {out / 'checkpoint-last.pth'}" in text, text[-3000:]
        assert code == 0, f"rank {rank} exited with {code}:\n{text[-3000:]}"
    # Each rank resumed its own running epoch loss, so the epoch means are the uninterrupted run's.
    assert epoch_losses(out) == epoch_losses(uninterrupted), (epoch_losses(out), epoch_losses(uninterrupted))


def test_ranks_that_restore_different_steps_stop_with_a_clear_error(data, tmp_path, stopped, uninterrupted):
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    results, spread = run_ranks(tiny_args(data, out), tmp_path, "other_file_on_rank_1",
                                 env={"FCMAE_TEST_OTHER_CHECKPOINT": str(uninterrupted / "checkpoint-0001.pth")})
    lines = [last_line(text) for _, text in results]
    for rank, (code, text) in enumerate(results):
        assert code == 2 and "Traceback" not in text, f"rank {rank} exited with {code}:\n{text[-3000:]}"
    assert lines[0] == lines[1], lines
    assert "the processes resumed different checkpoints: rank 0 step 2" in lines[0] and "rank 1 step 4" in lines[0]
    assert spread < TIMEOUT_S / 2, f"the ranks stopped {spread:.0f} s apart: one waited for the other"


# ---------------------------------------------------------------- through the launcher
def test_through_the_launcher_a_rank_with_unreadable_images_ends_the_job_with_one_message(data, tmp_path):
    """`NPROC_PER_NODE=2 launch/pretrain.sh` (torchrun) on a folder with 6 zero-byte images among 22."""
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    for i in range(6):
        (bad / "train" / "a" / f"zero_{i}.png").write_bytes(b"")
    args = tiny_args(bad, tmp_path / "out", "--max_bad_fraction", "0.1")  # at most 2 of 22
    proc = subprocess.run(["bash", str(REPO / "launch" / "pretrain.sh"), *args], cwd=REPO, capture_output=True,
                          text=True, env={**base_env(tmp_path), "NPROC_PER_NODE": "2"}, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit code {proc.returncode}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    errors = {line for line in text.splitlines() if line.startswith("fcmae-pretrain: error:")}
    assert len(errors) == 1, errors  # every rank that printed one printed the same
    assert " of 22 images are unreadable" in errors.pop()
    assert "launch: rank " in text.strip().splitlines()[-1]


def test_the_launchers_exit_code_is_the_first_rank_that_failed_on_its_own(monkeypatch, capsys):
    """A rank that died of a signal while the others stopped (an abort at exit) does not hide their exit code."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from fcmae.runtime.launch import torchrun

    aborted = ProcessFailure(local_rank=1, pid=11, exitcode=-6, error_file="<N/A>")
    stopped = ProcessFailure(local_rank=0, pid=10, exitcode=2, error_file="<N/A>")
    aborted.timestamp, stopped.timestamp = 100, 101

    def failing_run(args):
        raise ChildFailedError("fcmae.pretrain.main", {0: stopped, 1: aborted})

    monkeypatch.setattr(torch.distributed.run, "run", failing_run)
    with pytest.raises(SystemExit) as e:
        torchrun.main(["--standalone", "--nproc_per_node", "2", "-m", "fcmae.pretrain.main"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "launch: rank 0 exited with code 2; the other ranks were stopped"
