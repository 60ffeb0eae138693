"""Automatic restarts (`max_restarts`): the launcher starts the training again after a rank dies, until it ends.

fcmae.runtime.launch.launcher runs the training through `run_with_restarts`
when `max_restarts` > 0 (one process: as a child, no longer by exec; several:
torchrun; inside a SLURM allocation: srun). When it fails, the exit code
says whether a restart can help (`restartable`):

- never after bad input (2), a non-finite loss (3), a full disk (4) or an
  output folder in use (5): the same run would only fail again, so the run
  ends with its one line (fcmae.runtime.errors.FINAL_EXIT_CODES);
- never after a stop: the launcher received a stop signal, or the training
  ended by SIGINT/SIGTERM or a Ctrl-C's 130;
- otherwise (a rank killed by a signal, a crash, a hang: 6, lost contact: 7)
  the training starts again, at most `max_restarts` times in all, and
  resumes from the newest checkpoint in the output folder (auto-resume;
  `resume_args` turns `--resume PATH` or `--resume none` into `--resume
  auto` once this launch has written a checkpoint of its own).

Every restart is one line on stderr and one record in log.jsonl:
`{"type": "restart", "restart": N, "max_restarts": M, "exit_code": C,
"cause": "rank 1 was killed by SIGKILL (signal 9)", "checkpoint": NAME or
null, "time": T}`. torchrun names the culprit (fcmae.runtime.launch.torchrun
writes it to FCMAE_FAILURE_REPORT). With several nodes each node's launcher
restarts its own torchrun and they meet again at the rendezvous; only the
node with NODE_RANK 0 writes the record. Under SLURM a requeued job
(`--requeue`) starts with the full `max_restarts` again: see
docs/fault-tolerance-and-slurm.md.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from fcmae.runtime.checkpoint import find_latest_checkpoint
from fcmae.runtime.errors import FINAL_EXIT_CODES
from fcmae.runtime.launch.torchrun import REPORT_VARIABLE
from fcmae.runtime.logs import JsonlLogger
from fcmae.runtime.signals import INTERRUPTED_EXIT_CODE

# Exit codes of a training stopped from outside: a Ctrl-C it saved for (130), or death by SIGINT / SIGTERM.
STOPPED_EXIT_CODES = (INTERRUPTED_EXIT_CODE, 128 + signal.SIGINT, 128 + signal.SIGTERM)


def restartable(code: int) -> bool:
    """Whether a training that ended with exit code `code` may be started again (see the module docstring)."""
    return code != 0 and code not in FINAL_EXIT_CODES and code not in STOPPED_EXIT_CODES


def describe_exit(code: int, launcher: str) -> str:
    """How the training ended, in words, from the launcher's view (torchrun's own report names the rank)."""
    who = "the training process" if launcher == "python" else launcher
    if code > 128:
        try:
            return f"{who} was killed by {signal.Signals(code - 128).name} (signal {code - 128})"
        except ValueError:
            pass
    return f"{who} exited with code {code}"


def resume_args(args: Sequence[str], resume: Optional[str], output_dir, since: float) -> List[str]:
    """The command line of a restart: `args`, plus `--resume auto` when the run was not auto-resuming and this
    launch (started at time `since`) has written a checkpoint to `output_dir` since."""
    if resume is not None and resume.lower() == "auto":
        return list(args)
    newest = find_latest_checkpoint(output_dir)
    if newest is None or newest.stat().st_mtime < since:
        return list(args)  # nothing new: start as the first time did
    return [*args, "--resume", "auto"]


def run_with_restarts(run: Callable[[Sequence[str], Mapping[str, str]], int],
                      argv_for: Callable[[List[str]], List[str]], args: Sequence[str], env: Mapping[str, str],
                      launcher: str, max_restarts: int, output_dir, resume: Optional[str],
                      stopped: Callable[[], bool]) -> int:
    """Run the training and restart it after failures that allow it; returns the last run's exit code.

    Args:
        run: (argv, env) -> exit code (fcmae.runtime.launch.launcher.Supervisor.run).
        argv_for: the command's arguments -> the full command line that starts every process.
        args: the command's arguments as the user gave them.
        env: the environment of the runs.
        launcher: python | torchrun | srun.
        max_restarts: how many restarts at most.
        output_dir, resume: the run's output folder and `resume` setting.
        stopped: whether the launcher received a stop signal (then nothing restarts).
    """
    since = time.time()
    writes_log = env.get("NODE_RANK", "0") in ("", "0")
    restarts, current = 0, list(args)
    while True:
        code, cause = _run_once(run, argv_for(current), env, launcher)
        if not restartable(code) or stopped():
            return code
        if restarts >= max_restarts:
            print(f"launch: {cause}; all {max_restarts} restart(s) used, the run ends here", file=sys.stderr,
                  flush=True)
            return code
        restarts += 1
        current = resume_args(args, resume, output_dir, since)
        newest = find_latest_checkpoint(output_dir)
        print(f"launch: {cause}; restart {restarts} of {max_restarts}, resuming from "
              f"{newest if newest is not None else 'the start (no checkpoint yet)'}", file=sys.stderr, flush=True)
        if writes_log:
            JsonlLogger(Path(output_dir) / "log.jsonl").write(
                {"type": "restart", "restart": restarts, "max_restarts": max_restarts, "exit_code": code,
                 "cause": cause, "checkpoint": newest.name if newest is not None else None, "time": time.time()})


def _run_once(run, argv: Sequence[str], env: Mapping[str, str], launcher: str) -> Tuple[int, str]:
    """(exit code, cause) of one run; torchrun reports its culprit through a file."""
    fd, report = tempfile.mkstemp(prefix="fcmae-failure-", suffix=".json")
    os.close(fd)
    try:
        code = run(argv, {**env, REPORT_VARIABLE: report})
        try:
            cause = json.loads(Path(report).read_text())["cause"]
        except (OSError, ValueError, KeyError):  # no report: not torchrun, or torchrun itself failed
            cause = describe_exit(code, launcher)
    finally:
        Path(report).unlink(missing_ok=True)
    return code, cause
