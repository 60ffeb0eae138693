"""Timed checkpoints: checkpoint-last.pth mid-epoch at most every `save_minutes`, written in the background.

A SIGKILL (the OOM killer, a lost node) loses the work since the last
checkpoint; epoch checkpoints alone can lose an epoch, hours on ImageNet.
With `save_minutes: M` the Trainer also saves mid-epoch once M minutes have
passed since the last checkpoint of any kind (`SaveClock`), at an
optimizer-step boundary, so the resume is exact as after a stop signal
(fcmae.runtime.trainer). Rank 0's clock decides and every rank learns it in
the all-reduce it does after each step anyway (fcmae.runtime.stepping.StopAgreement).

Only the copy of the state to host memory (`HostSnapshot`) holds the step up;
`BackgroundWriter` then writes the file in a thread, with the atomic rename
and full-disk message of fcmae.runtime.files.write_atomic. At most one write
is in flight: the next save, and the end of the run, wait for it. A write
that failed (a full disk) stops every rank at the next step with its message.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch


class SaveClock:
    """Whether a timed checkpoint is due: `minutes` since the last checkpoint of any kind (None: never).

    Args:
        minutes: the interval; None turns timed checkpoints off.
        now: the clock in seconds (time.monotonic; tests pass their own).
    """

    def __init__(self, minutes: Optional[float], now: Callable[[], float] = time.monotonic):
        self.minutes, self._now = minutes, now
        self.last = now()

    def due(self) -> bool:
        return self.minutes is not None and self._now() - self.last >= self.minutes * 60

    def saved(self) -> None:
        """A checkpoint was just taken: the next one is due `minutes` from now."""
        self.last = self._now()


class HostSnapshot:
    """Copies of a state's tensors in host memory, into buffers kept from one snapshot to the next.

    `take(state)` returns `state` (nested dicts, lists, tuples) with every
    tensor replaced by its copy, which training may go on changing the
    original of. The buffers are allocated at the first snapshot and reused
    (a fresh allocation costs most of the copy's time: its pages are touched
    for the first time), so rank 0 holds one more copy of the model and
    optimizer state in host memory while timed checkpoints are on. A CUDA
    tensor's buffer is pinned, so that its copy runs as one asynchronous
    transfer, waited for once. A buffer must not be taken again before the
    write of the previous snapshot has ended (BackgroundWriter.start waits).
    """

    def __init__(self):
        self._buffers: Dict[Tuple[Any, ...], torch.Tensor] = {}

    def take(self, state: Any) -> Any:
        copied = self._copy(state, ())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the asynchronous copies from the GPU have landed
        return copied

    def _copy(self, obj: Any, where: Tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            buffer = self._buffers.get(where)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                buffer = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                self._buffers[where] = buffer
            return buffer.copy_(obj.detach(), non_blocking=obj.is_cuda)
        if isinstance(obj, Mapping):
            return {key: self._copy(value, (*where, key)) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(value, (*where, i)) for i, value in enumerate(obj))
        return obj


class BackgroundWriter:
    """One write at a time in a thread of its own; its error is kept for the caller."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, write: Callable[[], Any]) -> None:
        """Run `write()` in the background, after the write in flight (if any) has ended.

        Raises the earlier write's error instead, if it failed.
        """
        error = self.wait()
        if error is not None:
            raise error

        def run() -> None:
            try:
                write()
            except BaseException as e:  # kept for the training loop, which stops every rank with it
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> Optional[BaseException]:
        """Wait for the write in flight; returns (and forgets) its error, or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def failure(self) -> Optional[BaseException]:
        """The error of a write that has ended (returned once), without waiting; None while one runs or none failed."""
        if self._thread is not None and self._thread.is_alive():
            return None
        return self.wait()
