"""Graceful stop on SIGTERM / SIGUSR1 (SLURM pre-emption, `scancel`, `kill`).

The handler only records the request; the training loop polls it
(fcmae.runtime.stepping.StopAgreement) after every iteration, saves a
checkpoint and exits with code 0. In multi-process runs the flag is agreed
on by all ranks, so every process stops at the same step even if only one
received the signal.

Schedulers signal every process of a job, DataLoader workers included:
`ignore_stop_signals` (the loaders' `worker_init_fn`) makes the workers
ignore them, so that only the main process decides. A training command
calls `install_stop_handler()` before its heavy imports (a signal that
arrives while torch is being imported must not kill the process) and keeps
the handler until it exits. This module imports nothing heavy.
"""

import signal
from typing import Iterable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# What loader workers ignore: the stop signals and the terminal's Ctrl-C (the main process handles them).
WORKER_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; `install()` hooks it up, `restore()` puts back the old handlers."""

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS):
        self.signals = list(signals)
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002 (signal handler signature)
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

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


# The process's one stop request: installed early by the commands, polled by the Trainer.
STOP = StopRequest()


def install_stop_handler() -> StopRequest:
    """Record SIGTERM / SIGUSR1 from now until the process exits (call it first thing in a command)."""
    return STOP.install()


def ignore_stop_signals(worker_id: int = 0) -> None:  # noqa: ARG001 (DataLoader's worker_init_fn signature)
    """In a DataLoader worker: ignore SIGTERM, SIGINT and SIGUSR1 (torch's own worker set-up runs first)."""
    for s in WORKER_IGNORED:
        signal.signal(s, signal.SIG_IGN)
