"""Driving a real SLURM cluster from tests: submit, wait, signal, read outputs.

The `slurm` tests need a running cluster (sbatch, squeue, scontrol and
scancel on PATH, and `sinfo` reporting a usable node). CI starts a
single-node one before the tests; without one the tests skip, with the
reason. Nothing here starts daemons.

Timing facts these helpers plan around (see docs/fault-tolerance-and-slurm.md):
- a requeued job is held ~121 s before it may start again; as root (the CI
  cluster) `start_now` lifts that hold with `scontrol update StartTime=now`;
- `--signal=SIG@N` and the time limit are handled by slurmctld's periodic
  checks, so they arrive up to ~30 s off the nominal moment;
- after a cancel, a job stays COMPLETING for up to KillWait (30 s) and holds
  its CPUs meanwhile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import pytest

from fcmae.runtime.logs import read_jsonl
from tests.helpers import single_process_env

REPO = Path(__file__).resolve().parents[1]
# Job states after which a job does not run again on its own.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


def cluster_problem() -> Optional[str]:
    """Why the SLURM tests cannot run here (None when a cluster answers and has a usable node)."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not on PATH)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM controller answers (sinfo timed out)"
    if out.returncode != 0:
        return f"no SLURM controller answers (sinfo: {(out.stderr or out.stdout).strip()[:200]})"
    states = set(out.stdout.split())
    if not states & {"idle", "mix", "alloc", "comp"}:
        return f"the SLURM cluster has no usable node (node states: {', '.join(sorted(states)) or 'none'})"
    return None


def require_cluster() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(f"{problem}; the slurm tests need a running cluster (CI starts a single-node one)")


def _run(cmd: List[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class Jobs:
    """The jobs one test submitted; `cancel_all()` (the fixture's teardown) ends whatever is left."""

    def __init__(self):
        self.ids: List[str] = []

    def submit(self, script: Path, *sbatch_args: str, args: Iterable[str] = (), cwd: Path = REPO,
               env: Optional[Dict[str, str]] = None) -> str:
        """`sbatch [sbatch_args] script [args]` from `cwd`; returns the job id."""
        # Variables of an enclosing job or torchrun would leak into the new job's environment.
        result = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *map(str, args)], cwd=cwd,
                                env=single_process_env(**(env or {})), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"sbatch failed: {result.stderr.strip()}"
        job = result.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def cancel_all(self) -> None:
        for job in self.ids:
            _run(["scancel", job])


def job_info(job: str) -> Dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...); {} once SLURM forgot the job."""
    out = _run(["scontrol", "show", "job", "-o", job])
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def job_state(job: str) -> str:
    return job_info(job).get("JobState", "GONE")


def wait_state(job: str, states: Iterable[str], timeout: float) -> str:
    """Poll until the job's state is one of `states` (or the job is gone); returns the state."""
    wanted = set(states) | {"GONE"}
    deadline = time.monotonic() + timeout
    state = job_state(job)
    while state not in wanted:
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout:.0f} s (waiting for {wanted})"
        time.sleep(0.5)
        state = job_state(job)
    return state


def wait_finished(job: str, timeout: float) -> Dict[str, str]:
    """Wait until the job ended for good (a final state, not COMPLETING); returns its last info."""
    wait_state(job, FINAL_STATES, timeout)
    return job_info(job)


def wait_requeued(job: str, timeout: float) -> Dict[str, str]:
    """Wait until the job's first run is over and it is queued again (Restarts >= 1, PENDING or RUNNING).

    Returns the job's info then, or as soon as it ends for good instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job)
        state = info.get("JobState", "GONE")
        if state in FINAL_STATES or state == "GONE":
            return info
        if int(info.get("Restarts", "0")) >= 1 and state in ("PENDING", "RUNNING"):
            return info
        assert time.monotonic() < deadline, f"job {job} neither requeued nor ended in {timeout:.0f} s ({state})"
        time.sleep(0.5)


def scancel(job: str, signal: Optional[str] = None, full: bool = False) -> None:
    """`scancel [--signal=SIG] [--full] JOB`; without a signal this cancels the job."""
    cmd = ["scancel"] + ([f"--signal={signal}"] if signal else []) + (["--full"] if full else []) + [job]
    result = _run(cmd)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr.strip()}"


def requeue(job: str) -> None:
    """`scontrol requeue JOB`: what SLURM's own pre-emption with PreemptMode=REQUEUE does to a job."""
    result = _run(["scontrol", "requeue", job])
    assert result.returncode == 0, f"scontrol requeue {job}: {result.stderr.strip()}"


def start_now(job: str, timeout: float = 60) -> None:
    """Lift the ~121 s hold SLURM puts on a requeued job (needs an operator; CI runs as root).

    Waits until the job is PENDING first (it is COMPLETING while its processes end).
    """
    wait_state(job, {"PENDING", "RUNNING"}, timeout)
    if job_state(job) == "PENDING":
        _run(["scontrol", "update", f"JobId={job}", "StartTime=now"])


def read_text(path: Path) -> str:
    return Path(path).read_text(errors="replace") if Path(path).exists() else ""


def train_records(out_dir: Path) -> List[dict]:
    path = Path(out_dir) / "log.jsonl"
    if not path.exists():
        return []
    try:
        return [r for r in read_jsonl(path) if r.get("type") == "train"]
    except ValueError:  # a line being written
        return []


def epoch_losses(out_dir: Path) -> List[float]:
    return [r["loss"] for r in read_jsonl(Path(out_dir) / "log.jsonl") if r.get("type") == "epoch"]


def wait_for_step(out_dir: Path, step: int, job: str, timeout: float, output: Optional[Path] = None) -> int:
    """Wait until log.jsonl shows optimizer step >= `step`; returns the step seen.

    Fails early, with the job's output, if the job ends first.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = train_records(out_dir)
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        state = job_state(job)
        if state in FINAL_STATES or state in ("GONE", "COMPLETING"):
            pytest.fail(f"job {job} ended ({state}) before step {step}:\n{read_text(output)[-3000:] if output else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} did not reach step {step} in {timeout:.0f} s:\n"
                        f"{read_text(output)[-3000:] if output else ''}")
        time.sleep(0.1)


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    from fcmae.runtime import checkpoint as ckpt

    return ckpt.find_latest_checkpoint(out_dir)


def checkpoint_step(out_dir: Path) -> Optional[int]:
    """The optimizer step of the newest checkpoint in `out_dir` (None if there is none)."""
    from fcmae.runtime import checkpoint as ckpt

    path = latest_checkpoint(out_dir)
    return None if path is None else int(ckpt.load_checkpoint(path)["step"])
