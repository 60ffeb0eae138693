"""What this project reads from SLURM, and the self-requeue after a pre-emption checkpoint.

docs/fault-tolerance-and-slurm.md has the measured behaviour these functions rely on:

- `SLURM_JOB_ID` is set in the whole allocation (the batch shell, plain
  processes it starts, and srun steps); `SLURM_PROCID` is set in the batch
  shell too (0), so it makes a process a rank only inside an srun step
  (`SLURM_STEP_ID` set), or when the launcher says so (`FCMAE_SLURM_RANKS=1`);
- tasks per node come from `SLURM_NTASKS_PER_NODE` (only with
  `--ntasks-per-node`), else `SLURM_TASKS_PER_NODE` (`2`, or `2(x3),1` on
  several nodes);
- `scontrol requeue` from inside a running job ends it and queues it again;
  during a cancel, time limit or SLURM's own pre-emption the job reads
  `JobState=COMPLETING`, and requeueing then would defeat the cancel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Dict, Mapping, Optional

RANKS_MARKER = "FCMAE_SLURM_RANKS"  # set to 1 by a launcher that starts one process per SLURM task itself


def in_allocation(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def in_step(env: Mapping[str, str]) -> bool:
    """True inside an srun step (not in the batch shell or a plain process it started)."""
    return bool(env.get("SLURM_STEP_ID")) and bool(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))


def rank_variables_apply(env: Mapping[str, str]) -> bool:
    """Whether SLURM_PROCID / SLURM_NTASKS describe this process's rank (an srun step, or the launcher's marker)."""
    return "SLURM_PROCID" in env and (in_step(env) or env.get(RANKS_MARKER) == "1")


def parse_tasks_per_node(value: str) -> int:
    """`SLURM_TASKS_PER_NODE` (`2`, `2(x3)`, `2(x3),1`) -> tasks per node; uneven counts are an error."""
    counts = set()
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot read SLURM_TASKS_PER_NODE={value!r}")
        counts.add(int(m.group(1)))
    if len(counts) != 1:
        raise ValueError(f"SLURM_TASKS_PER_NODE={value!r}: the nodes have different task counts; ask for the "
                         "same number of tasks on every node (--ntasks-per-node)")
    return counts.pop()


def tasks_per_node(env: Mapping[str, str]) -> Optional[int]:
    """The allocation's tasks per node (None when SLURM does not say)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return parse_tasks_per_node(env["SLURM_NTASKS_PER_NODE"])
    if env.get("SLURM_TASKS_PER_NODE"):
        return parse_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
    return None


def master_addr(env: Mapping[str, str]) -> str:
    """The allocation's first host (`scontrol show hostnames` of SLURM_JOB_NODELIST, else SLURM_NODELIST),
    for MASTER_ADDR; 127.0.0.1 when there is no node list or scontrol cannot read it."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "127.0.0.1"
    hosts = out.stdout.split() if out.returncode == 0 else []
    return hosts[0] if hosts else "127.0.0.1"


def job_info(job: str) -> Dict[str, str]:
    """`scontrol show job -o JOB` as a dict ({} when it cannot be read)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def requeue_if_running(env: Mapping[str, str]) -> Optional[str]:
    """After a pre-emption checkpoint: `scontrol requeue` this job if it may be requeued and is still RUNNING.

    Returns a line for the log (None outside SLURM). A job that is being
    cancelled, timed out or pre-empted by SLURM is left alone.
    """
    job = env.get("SLURM_JOB_ID")
    if not job or shutil.which("scontrol") is None:
        return None
    info = job_info(job)
    if info.get("Requeue") != "1":
        return f"SLURM job {job} is not requeueable (sbatch --requeue); submit the same command again to resume"
    if info.get("JobState") != "RUNNING":
        return f"SLURM job {job} is {info.get('JobState', 'in an unknown state')}: not requeued"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol requeue {job} failed ({e}); submit the same command again to resume"
    if result.returncode != 0:
        return f"scontrol requeue {job} failed ({result.stderr.strip()}); submit the same command again to resume"
    return f"requeued SLURM job {job}: it resumes from this checkpoint when it starts again"
