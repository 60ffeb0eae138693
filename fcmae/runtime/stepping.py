"""The two pieces of bookkeeping around a training step, each behind one name.

`StopAgreement`: every process must stop at the same iteration, and a
non-finite loss must stop the run, without a host sync per iteration. Each
iteration's loss is recorded on the device; `check` then either only reads
the local stop flag (one process, between optimizer steps) or does one
all-reduce of [stop requested (by which signal), non-finite loss, other
failure, timed save due] and one host sync, and adds the checked losses
to the epoch's running sum. The last flag carries rank 0's `save_due()` at
optimizer-step boundaries (fcmae.runtime.timed_saves): every rank reads the same
`save_now` from it. A failure that
one rank meets alone (too many unreadable images) is only recorded
(`fail_at_next_check`) and raised on every rank at the next check, so no
rank is left waiting in a collective.

`AccumulationWindow`: the iterations of one optimizer step (gradient
accumulation over `update_freq` iterations). At the start of a window it
keeps the position, the epoch's loss sums and the RNG state; a stop inside
the window goes back there (the partial gradients are dropped), so the
checkpoint is written at once and a resumed run continues exactly.
"""

from __future__ import annotations

import math
import signal
from typing import Any, Callable, List, Optional, Tuple

import torch

from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime import distributed
from fcmae.runtime.errors import NonFiniteLossError


class StopAgreement:
    """Where the processes agree to stop, and where the recorded losses are checked.

    Args:
        info: this process's place in the process group.
        stop: the process's stop request (fcmae.runtime.signals.StopRequest).
        exit_after_steps: behave as if asked to stop after this many optimizer steps (tests), or None.
    """

    def __init__(self, info: distributed.DistInfo, stop, exit_after_steps: Optional[int] = None):
        self.info, self.device = info, info.device
        self.stop, self.exit_after_steps = stop, exit_after_steps
        self.exit_requested = False  # exit_after_steps reached: stops like a signal, but no SLURM requeue follows
        self.unchecked: List[Tuple[torch.Tensor, int, int, int]] = []  # (loss, epoch, iteration, optimizer step)
        self.failure: Optional[BaseException] = None  # raised on every rank at the next check
        self.save_due: Callable[[], bool] = lambda: False  # rank 0's timed-checkpoint clock (set by the Trainer)
        self.save_now = False  # agreed by the last check: every rank saves a timed checkpoint now
        self.signal: Optional[int] = None  # agreed by the last check: the stop signal of some rank (see check)

    def record(self, loss: torch.Tensor, epoch: int, iteration: int, step: int) -> torch.Tensor:
        """Keep an iteration's loss for the next check; returns it detached, as float32, on the device."""
        value = loss.detach().float()
        self.unchecked.append((value, epoch, iteration, step))
        return value

    def fail_at_next_check(self, error: Exception) -> None:
        """Stop every rank at the next `check` with `error` (the first one a rank records counts).

        `error` must pickle and take its message as its one argument (it is sent to the other ranks).
        """
        if self.failure is None:
            self.failure = error

    def discard_unchecked(self) -> None:
        """Forget the losses of iterations that are being undone (AccumulationWindow.roll_back)."""
        self.unchecked = []

    def check(self, state, step: int, boundary: bool = True) -> bool:
        """True on every rank once any rank was asked to stop; raises on every rank once any rank failed.

        Called after every iteration (`boundary`: an optimizer step was just
        taken; `step`: the optimizer steps done). The checked losses are added
        to `state`'s epoch sums. When some rank saw a non-finite loss or
        recorded a failure, every rank raises the lowest such rank's error
        (NonFiniteLossError, or what `fail_at_next_check` got) with the same
        message. Afterwards `save_now` says whether every rank takes a timed
        checkpoint at this boundary, and `signal` is the stop signal that some
        rank received (the highest number when ranks received different ones;
        None for exit_after_steps alone), the same on every rank: the stop
        flag carries each rank's signal number.
        """
        if self.exit_after_steps is not None and step >= self.exit_after_steps:
            self.exit_requested = True
        asked = self.stop.received is not None or self.exit_requested
        self.save_now, self.signal = False, self.stop.received
        if self.info.world_size == 1 and not boundary and self.failure is None:
            return asked
        pending, self.unchecked = self.unchecked, []
        losses = torch.stack([loss for loss, *_ in pending]) if pending else torch.zeros(0, device=self.device)
        save = boundary and self.info.is_main and self.save_due()
        # the stop flag: this rank's signal number, 0.5 for exit_after_steps alone, 0 for no stop
        own_stop = float(self.stop.received) if self.stop.received is not None else 0.5 * self.exit_requested
        flags = torch.tensor([own_stop, 0.0, float(self.failure is not None), float(save)]).to(losses.device)
        flags[1] = (~torch.isfinite(losses)).any()
        flags = distributed.all_reduce_max(flags, self.reduce_device())
        values = torch.cat([flags.float().to(losses.device), losses]).tolist()  # the one host sync
        stop, non_finite, failed, local_losses = values[0], values[1], values[2], values[4:]
        self.save_now = boundary and values[3] > 0
        self.signal = int(stop) if stop >= 1 else None
        for value in local_losses:
            state.epoch_loss_sum += value
            state.epoch_loss_count += 1
        if non_finite or failed:
            self._raise_agreed_failure(pending, local_losses)
        return stop > 0

    def cause(self, received: Optional[int]) -> str:
        """What stopped the run, as a rank that `received` this signal (or None) says it: the signal the ranks
        agreed on, received here or on another rank, or exit_after_steps."""
        if self.signal is None:
            return "exit_after_steps"
        name = signal.Signals(self.signal).name
        return name if self.signal == received else f"{name} on another rank"

    def reduce_device(self) -> Optional[torch.device]:
        """Where collectives run: the GPU under NCCL, else the CPU (gloo)."""
        return self.device if self.device.type == "cuda" else None

    def _raise_agreed_failure(self, pending, local_losses) -> None:
        """Raise, on every rank, the error of the lowest rank that met one."""
        error = self.failure
        if error is None:
            for (_, epoch, iteration, step), value in zip(pending, local_losses):
                if not math.isfinite(value):
                    error = NonFiniteLossError(f"loss is {value} at epoch {epoch + 1}, iteration {iteration} "
                                               f"(optimizer step {step}); training stopped")
                    break
        found = distributed.first_error(error)
        if found is None:  # cannot happen: the rank that raised a flag has its error
            raise RuntimeError("a rank flagged a failure but none reported it")
        rank, error = found
        if self.info.world_size > 1:
            error = type(error)(f"rank {rank} of {self.info.world_size}: {error}")
        raise error


class AccumulationWindow:
    """The iterations of one optimizer step, and the way back to the step's start.

    Args:
        update_freq: iterations per optimizer step.
    """

    def __init__(self, update_freq: int):
        self.update_freq = update_freq
        self._start: Optional[Tuple[int, float, int, Any]] = None

    def opens_at(self, iteration: int) -> bool:
        return iteration % self.update_freq == 0

    def closes_at(self, iteration: int) -> bool:
        """True when an optimizer step follows `iteration`."""
        return (iteration + 1) % self.update_freq == 0

    def open(self, state) -> None:
        """Remember where the window starts (only needed when it spans several iterations)."""
        if self.update_freq > 1:
            self._start = (state.iteration, state.epoch_loss_sum, state.epoch_loss_count, ckpt.rng_state())

    def roll_back(self, state, optimizer: torch.optim.Optimizer, agreement: StopAgreement) -> None:
        """Undo the iterations since the window opened: position, loss sums, RNG state and gradients."""
        state.iteration, state.epoch_loss_sum, state.epoch_loss_count, rng = self._start
        agreement.discard_unchecked()  # losses of the dropped iterations (one process: not yet checked)
        ckpt.set_rng_state(rng)
        optimizer.zero_grad(set_to_none=True)
