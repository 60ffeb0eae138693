"""Graceful stop on SIGTERM / SIGUSR1 (SLURM pre-emption, `scancel`, `kill`).

The handler only records the request; the training loop polls it
(fcmae.runtime.trainer.Trainer.should_stop) at each optimizer-step boundary, saves a
checkpoint there and exits cleanly. In multi-process runs the flag is
agreed on by all ranks (an all-reduce of one number per poll), so every
process stops at the same step even if only one received the signal.
"""

import signal
from typing import Iterable, Optional


class StopRequest:
    """Records a stop signal; `install()` hooks it up, `restore()` puts back the old handlers."""

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, getattr(signal, "SIGUSR1", None))):
        self.signals = [s for s in signals if s is not None]
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        self.received = signum

    def install(self) -> "StopRequest":
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

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop from code (as if `signum` had been received)."""
        self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
