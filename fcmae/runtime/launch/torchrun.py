"""torchrun, as `python -m torch.distributed.run` runs it, but one line instead of a traceback when a rank fails.

    python -m fcmae.runtime.launch.torchrun [torchrun's arguments]

fcmae.runtime.launch.launcher starts several processes on a node with this. When
a training process fails, it has printed its own message (a failure that
one rank meets stops every rank with the same message: see
fcmae.runtime.stepping.StopAgreement), so torchrun's ChildFailedError
traceback would only bury it: this prints which rank failed first and how,
and exits with that rank's exit code (2: bad input, 3: a non-finite loss, ...)
or 128 + N for a rank killed by signal N, instead of 1 (`culprit`).

The culprit is the first failure of the first kind that has one:
1. a rank that exited with a code of its own (an error it met or the ranks
   agreed on), but not 7, a rank that lost contact with a dead one;
2. a rank killed by a signal (SIGKILL from the OOM killer, a segfault),
   but not torchrun's SIGTERM to the others;
3. the rest: ranks that lost contact (7), ranks that torchrun stopped.
So a rank killed with `kill -9` is named, not the rank whose next collective
broke; and an abort while exiting does not hide the agreed error. Within a
kind the earliest counts: torchrun's timestamps (whole seconds), then the
order in which it saw the failures.

With FCMAE_FAILURE_REPORT set, the culprit is also written there as one line
of JSON (rank, exit_code, cause), for the launcher's restart record.
"""

import json
import os
import signal
import sys
from typing import Mapping, Optional, Sequence, Tuple

import torch.distributed.run as torch_run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from fcmae.runtime.errors import LostContactError
from fcmae.runtime.lifeline import PARENT_VARIABLE
from fcmae.runtime.signals import INTERRUPTED_EXIT_CODE

REPORT_VARIABLE = "FCMAE_FAILURE_REPORT"


def _kind(exitcode: int) -> int:
    """0: the rank's own failure; 1: killed by a signal; 2: a victim (lost contact, stopped by torchrun)."""
    if exitcode > 0:
        return 2 if exitcode == LostContactError.exit_code else 0
    return 2 if exitcode == -signal.SIGTERM else 1


def culprit(failures: Mapping[int, object]) -> int:
    """The rank whose failure came first (see the module docstring); `failures`: torchrun's, rank -> failure
    with `exitcode` (negative: killed by that signal) and `timestamp`, in the order torchrun saw them."""
    order = {rank: i for i, rank in enumerate(failures)}
    return min(failures, key=lambda r: (_kind(failures[r].exitcode), failures[r].timestamp, order[r]))


def describe(rank: int, exitcode: int) -> Tuple[str, int]:
    """(how rank `rank` failed, in words; the exit code that stands for it: its own, or 128 + N for signal N)."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        return f"rank {rank} was killed by {name} (signal {-exitcode})", 128 - exitcode
    return f"rank {rank} exited with code {exitcode}", exitcode


def main(argv: Optional[Sequence[str]] = None) -> None:
    previous = os.environ.get(PARENT_VARIABLE)
    os.environ[PARENT_VARIABLE] = str(os.getpid())  # each rank ends with this process (fcmae.runtime.lifeline)
    try:
        torch_run.run(torch_run.parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as e:
        rank = culprit(e.failures)
        cause, code = describe(rank, e.failures[rank].exitcode)
        if code != INTERRUPTED_EXIT_CODE:  # a second Ctrl-C: the ranks have said so
            print(f"launch: {cause}; the other ranks were stopped", file=sys.stderr, flush=True)
        report = os.environ.get(REPORT_VARIABLE)
        if report:
            with open(report, "w") as f:
                f.write(json.dumps({"rank": rank, "exit_code": code, "cause": cause}) + "\n")
        sys.exit(code)
    finally:  # called in-process (tests), the variable must not outlive the call
        if previous is None:
            os.environ.pop(PARENT_VARIABLE, None)
        else:
            os.environ[PARENT_VARIABLE] = previous


if __name__ == "__main__":
    main()
