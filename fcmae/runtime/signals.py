"""Graceful stop on SIGTERM / SIGUSR1 (SLURM pre-emption, `scancel`, `kill`).

The handler only records the request; the training loop polls it
(fcmae.runtime.stepping.StopAgreement) after every iteration, saves a
checkpoint and exits with code 0. In multi-process runs the flag is agreed
on by all ranks, so every process stops at the same step even if only one
received the signal.

Schedulers signal every process of a job, DataLoader workers included:
`ignore_stop_signals` (called by the loaders' `worker_init_fn`,
fcmae.runtime.lifeline.loader_worker_init) makes the workers ignore them,
so that only the main process decides. A training command
calls `install_stop_handler()` before its heavy imports (a signal that
arrives while torch is being imported must not kill the process) and keeps
the handler until it exits. This module imports nothing heavy.

Ctrl-C (SIGINT) is a stop like the others while a training loop can save
(`StopRequest.saving`, set by fcmae.runtime.trainer.Trainer.fit): the run
saves, says so in one line and exits 130 (fcmae.runtime.command.TrainSpec).
Before the loop (nothing to save yet), after it, and at a second Ctrl-C it
raises KeyboardInterrupt at once, which the command prints as one line
(fcmae.runtime.command.run_cli).
"""

import signal
import sys
from typing import Iterable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT = signal.SIGINT  # the terminal's Ctrl-C
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: what a shell reports for a Ctrl-C
# What loader workers ignore: the stop signals and the terminal's Ctrl-C (the main process handles them).
WORKER_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; `install()` hooks it up, `restore()` puts back the old handlers and forgets it.

    SIGINT is recorded only while `saving` and no stop was recorded before; otherwise it raises
    KeyboardInterrupt (see the module docstring).
    """

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS + (INTERRUPT,)):
        self.signals = list(signals)
        self.received: Optional[int] = None
        self.saving = False  # a training loop runs that stops and saves at the next iteration
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        if signum == INTERRUPT and (not self.saving or self.received is not None):
            raise KeyboardInterrupt  # nothing to save, or a second Ctrl-C: stop at once
        if self.received is None:  # the first one names the stop (a launcher may pass on another one later)
            self.received = signum

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopRequest":
        """Hook the handler up (a no-op when it already is)."""
        if self.installed:
            return self
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread: leave signals alone
                pass
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        self.received, self.saving = None, False

    @property
    def interrupted(self) -> bool:
        """Whether the stop is a Ctrl-C (exit code INTERRUPTED_EXIT_CODE, no SLURM requeue)."""
        return self.received == INTERRUPT

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


# The process's one stop request: installed early by the commands, polled by the Trainer.
STOP = StopRequest()


def install_stop_handler() -> StopRequest:
    """Record SIGTERM / SIGUSR1 from now until the process exits (call it first thing in a command).

    A Ctrl-C before the command's own error handling is in place (while its modules are imported) prints one
    line instead of a traceback (`quiet_ctrl_c`).
    """
    quiet_ctrl_c()
    return STOP.install()


def quiet_ctrl_c() -> None:
    """From now on a KeyboardInterrupt that nothing catches prints one line, not a traceback (sys.excepthook).

    For the time a command's modules are imported; its own error handling (fcmae.runtime.command.run_cli)
    takes over once it runs.
    """
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _one_line_for_ctrl_c


def _one_line_for_ctrl_c(kind, value, traceback) -> None:
    """sys.excepthook: a KeyboardInterrupt that nothing caught is one line; anything else as Python prints it."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted before the command started; nothing was saved", file=sys.stderr, flush=True)
    else:
        sys.__excepthook__(kind, value, traceback)


def ignore_stop_signals(worker_id: int = 0) -> None:  # noqa: ARG001 (DataLoader's worker_init_fn signature)
    """In a DataLoader worker: ignore SIGTERM, SIGINT and SIGUSR1 (torch's own worker set-up runs first)."""
    for s in WORKER_IGNORED:
        signal.signal(s, signal.SIG_IGN)
