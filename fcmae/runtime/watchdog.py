"""The hang watchdog (`hang_minutes`): a rank that makes no training step for that long dumps its stacks and exits 6.

A wedged collective (a peer stuck in a driver call, a dead NFS mount under
the loader) otherwise waits for the process group's timeout (30 minutes)
and shows nothing of where it stood. With `hang_minutes: M`, every rank
runs a `HangWatchdog` thread while the Trainer trains: the loop calls
`beat()` after every iteration and around each epoch's end; if M minutes
pass without one, the thread

1. writes the Python stack of every thread of the process to
   `stacks-rank<R>.txt` in the output folder (faulthandler.dump_traceback);
2. prints one line (`hang watchdog: rank R: no training step for M minutes ...`);
3. waits a few seconds, so that the other ranks, which wait for this one in
   a collective and stopped stepping at the same moment, write their stacks
   too before this rank's exit breaks their collective (a rank whose
   watchdog has fired leaves that error unsaid: `FIRED`, `wait_for_exit`);
4. ends the process with exit code 6 (fcmae.runtime.errors.HangError), which
   the launcher restarts when `max_restarts` allows
   (fcmae.runtime.launch.restarts).

The thread needs Python's GIL: a wedge in C code that holds the GIL is not
seen (the process group's timeout remains for those). The epoch's end
(evaluation, kNN monitor, checkpoint) must take less than M minutes: choose
M above the longest of them and the first step's compilation.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from fcmae.runtime.errors import HangError

# Set once this process's watchdog has fired: it has said why and ends the process, whatever else fails meanwhile.
FIRED = threading.Event()


def stacks_path(output_dir, rank: int) -> Path:
    """Where rank `rank` writes its stacks."""
    return Path(output_dir) / f"stacks-rank{rank}.txt"


class HangWatchdog:
    """A thread that ends the process when `beat()` was not called for `minutes` (see the module docstring).

    Args:
        minutes: the limit; None: no watchdog (start and beat do nothing).
        output_dir: where stacks-rank<R>.txt goes.
        rank: this process's rank.
        grace_s: seconds between the stacks and the exit (the other ranks write theirs meanwhile).
        exit: ends the process with the given code (os._exit; tests pass their own).
    """

    def __init__(self, minutes: Optional[float], output_dir, rank: int, grace_s: float = 5.0,
                 exit: Callable[[int], None] = os._exit):
        self.minutes, self.output_dir, self.rank = minutes, output_dir, rank
        self.grace_s, self._exit = grace_s, exit
        self.last = time.monotonic()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self) -> None:
        """Training made progress: the limit counts from now."""
        self.last = time.monotonic()

    def start(self) -> "HangWatchdog":
        if self.minutes is not None and self._thread is None:
            self.beat()
            self._stopped.clear()
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stopped.set()
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        limit = self.minutes * 60
        interval = min(max(limit / 20, 0.05), 10.0)
        while not self._stopped.wait(interval):
            if time.monotonic() - self.last >= limit:
                self._fire()
                return

    def _fire(self) -> None:
        FIRED.set()
        path = stacks_path(self.output_dir, self.rank)
        try:
            with open(path, "w") as f:
                f.write(f"rank {self.rank} (pid {os.getpid()}): no training step for {self.minutes:g} minutes; "
                        "the Python stack of every thread:\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            where = f"the Python stacks of its threads are in {path}"
        except OSError as e:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            where = f"could not write {path} ({e.strerror or e}): its stacks are above"
        print(f"hang watchdog: rank {self.rank}: no training step for {self.minutes:g} minutes (hang_minutes); "
              f"{where}; stopping with exit code {HangError.exit_code}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        time.sleep(self.grace_s)
        self._exit(HangError.exit_code)

# The longest `wait_for_exit` waits: the watchdog ends the process `grace_s` (5 s) after it fired.
EXIT_WAIT_S = 30.0


def wait_for_exit() -> None:
    """In a thread other than the watchdog's, once it has fired: give it time to end the process (exit 6)."""
    time.sleep(EXIT_WAIT_S)
