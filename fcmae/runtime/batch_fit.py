"""The per-GPU batch chosen for the device (`batch_fit: auto`): the largest that fits and divides the recipe's step.

The recipe fixes the effective batch; today's plan keeps the recipe's per-GPU
batch and accumulates (base on 8 GPUs: 64 x 8 iterations per optimizer step).
Fewer, larger iterations keep a GPU busier. With `batch_fit: auto` on CUDA the
plan uses the largest per-GPU batch that

- divides effective_batch / world_size (so update_freq stays an integer and
  the effective batch, hence the lr, stay the recipe's), and
- fits the device: its measured peak stays below (1 - MEMORY_MARGIN) of the
  memory this process may use, less what the measurement leaves out (DDP's
  gradient buckets).

How it is found (`fit_to_memory`): a training step (forward, backward, AdamW)
of the real model on synthetic images is measured at two small batches
(about 8 and 16); the two peaks give a line, fixed bytes + bytes per image,
which names the largest candidate expected to fit. That candidate is then
run (the confirmation trial); the line is redrawn through the two largest
measured batches and the next guess tried, until the guess is a batch already
measured to fit. A trial that runs out of memory, or peaks above the budget,
rules out its batch and every larger one. So the chosen batch has always run.

`DeviceMemory` is how the fit reads memory: `CudaMemory` on a GPU (peak
reserved bytes, torch.cuda.mem_get_info); the CPU tests give their own
numbers to the same selection code. Every rank measures its own GPU; the
smallest batch of all ranks is used (`agree_across_ranks`).

An explicit batch size (`--batch_size`, or `batch_size` in a `--config` file)
turns the fit off (`batch_size_given`), and so does an explicit update_freq.
None of this has run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch

from fcmae.runtime import distributed
from fcmae.runtime.config import load_yaml
from fcmae.runtime.errors import PlanError
from fcmae.runtime.plan import BatchChoice, Plan

BATCH_FIT_MODES = ("auto", "off")
MEMORY_MARGIN = 0.10  # fraction of the usable memory left free: allocator fragmentation, loader and kNN buffers
PROBE_BATCHES = (8, 16)  # the two small batches of the memory line (the nearest candidates at or below)
GIB = 1024 ** 3

Peak = Callable[[int], Optional[int]]  # batch -> peak bytes of one training step, None when it ran out of memory


def parse_batch_fit(value: object) -> object:
    """The batch_fit setting as a word: YAML reads `off` as false (and `on` as true, here `auto`)."""
    return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


def batch_size_given(overrides: Mapping[str, object], extra_files: Sequence[Path]) -> bool:
    """Whether the user set the per-GPU batch: `--batch_size` on the command line or in a `--config` file."""
    return "batch_size" in overrides or any("batch_size" in load_yaml(path) for path in extra_files)


def batch_fit_wanted(mode: str, device: torch.device, update_freq: Optional[int]) -> bool:
    """`batch_fit: auto` fits on CUDA only, and only when update_freq is auto (an explicit one fixes the split)."""
    return mode == "auto" and device.type == "cuda" and update_freq is None


def batch_candidates(per_process: int) -> List[int]:
    """The per-GPU batches that divide `per_process` (= effective batch / world size), ascending."""
    return [batch for batch in range(1, per_process + 1) if per_process % batch == 0]


@dataclass(frozen=True)
class MemoryLine:
    """Peak bytes of a step as fixed + per_image x batch, drawn through two measured (batch, peak) points."""

    fixed: float
    per_image: float

    @classmethod
    def through(cls, low: Tuple[int, int], high: Tuple[int, int]) -> "MemoryLine":
        (b1, m1), (b2, m2) = low, high
        per_image = max((m2 - m1) / (b2 - b1), 1.0)  # never flat or falling: that would promise any batch fits
        return cls(m2 - per_image * b2, per_image)

    def peak(self, batch: int) -> float:
        return self.fixed + self.per_image * batch


def fit_to_memory(candidates: Sequence[int], peak: Peak, budget: float) -> Tuple[int, Dict[int, Optional[int]]]:
    """(the largest candidate measured to fit `budget`, every trial's {batch: peak or None}).

    Args:
        candidates: the allowed batches, ascending (`batch_candidates`).
        peak: measures one training step at a batch (None: out of memory).
        budget: the bytes a step may peak at.

    Raises PlanError when not even the smallest candidate fits.
    """
    trials: Dict[int, Optional[int]] = {}
    too_big = candidates[-1] + 1  # the smallest batch known not to fit

    def trial(batch: int) -> None:
        nonlocal too_big
        trials[batch] = peak(batch)
        if trials[batch] is None or trials[batch] > budget:
            too_big = min(too_big, batch)

    high = max(c for c in candidates if c <= PROBE_BATCHES[1])  # the two small batches of the first line
    low = max((c for c in candidates if c <= min(high // 2, PROBE_BATCHES[0])), default=None)
    for batch in ([low] if low is not None else []) + [high]:
        if batch < too_big:
            trial(batch)
    while True:
        allowed = [c for c in candidates if c < too_big]
        if not allowed:
            raise PlanError(f"out of memory: a training step does not fit the device even at per-GPU batch "
                            f"{candidates[0]} ({_peaks_text(trials)}, budget {budget / GIB:.1f} GiB); use a smaller "
                            "model or input_size, or a GPU with more memory")
        measured = sorted((b, m) for b, m in trials.items() if m is not None)
        if len(measured) >= 2:
            line = MemoryLine.through(measured[-2], measured[-1])
            guess = max([c for c in allowed if line.peak(c) <= budget], default=allowed[0])
        else:
            guess = allowed[-1]  # too few numbers for a line: try the next smaller candidate
        fitting = [b for b in allowed if trials.get(b) is not None]
        if fitting and guess <= max(fitting):
            return max(fitting), trials
        trial(guess)


def _peaks_text(trials: Mapping[int, Optional[int]]) -> str:
    return ", ".join(f"{batch}: {'out of memory' if peak is None else f'{peak / GIB:.2f} GiB'}"
                     for batch, peak in sorted(trials.items()))


class DeviceMemory(Protocol):
    """How the fit reads a device's memory; `CudaMemory` on a GPU, the tests' own numbers on CPU."""

    def usable_bytes(self) -> int:
        """The bytes this process may fill (what it holds already included)."""

    def peak_bytes(self, step: Callable[[int], None], batch: int) -> Optional[int]:
        """Run `step(batch)` and return its peak bytes; None when it ran out of memory."""


class CudaMemory(DeviceMemory):
    """A CUDA device's memory: free memory plus this process's own reserve; peaks of reserved (not only allocated)
    memory, as fragmentation counts towards running out. Each step runs twice and the second is measured: the first
    pays one-off allocations (cudnn.benchmark's algorithm search, lazily created state)."""

    def __init__(self, device: torch.device):
        self.device = device

    def usable_bytes(self) -> int:
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device)

    def peak_bytes(self, step: Callable[[int], None], batch: int) -> Optional[int]:
        peak = None
        try:
            step(batch)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            step(batch)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_reserved(self.device)
        except torch.cuda.OutOfMemoryError:
            pass  # the step's tensors go with the exception; the cache is emptied below
        torch.cuda.empty_cache()
        return peak


def fit_to_device(per_process: int, recipe_batch: int, world_size: int, step: Callable[[int], None],
                  memory: DeviceMemory, unmeasured_bytes: int = 0, margin: float = MEMORY_MARGIN) -> BatchChoice:
    """The per-GPU batch for this device, and the plan's note on why.

    Args:
        per_process: effective batch / world size; the batch divides it.
        recipe_batch: the recipe's per-GPU batch (for the note).
        world_size: the number of processes (for the note).
        step: one training step at a batch (forward, backward, optimizer step of the real model).
        memory: the device's memory (CudaMemory).
        unmeasured_bytes: what the run holds besides the step measured (DDP's gradient buckets).
        margin: the fraction of the usable memory left free.
    """
    usable = memory.usable_bytes()
    budget = usable * (1 - margin) - unmeasured_bytes
    batch, trials = fit_to_memory(batch_candidates(per_process), lambda b: memory.peak_bytes(step, b), budget)
    lead = "raised" if batch > recipe_batch else "kept" if batch == recipe_batch else "lowered"
    note = (f"per-GPU batch {lead} from the recipe's {recipe_batch} to {batch} (batch_fit auto; --batch_size or "
            f"--batch_fit off keeps the recipe's): the largest divisor of {per_process} (= effective batch / "
            f"{world_size} processes) whose measured step fits {1 - margin:.0%} of the {usable / GIB:.1f} GiB usable"
            + (f" less {unmeasured_bytes / GIB:.2f} GiB for DDP's buckets" if unmeasured_bytes else "")
            + f"; peaks by batch: {_peaks_text(trials)}; effective batch and lr stay the recipe's")
    return BatchChoice(batch, note)


def agree_across_ranks(choice: BatchChoice, device: torch.device,
                       reduce_max: Callable = distributed.all_reduce_max) -> BatchChoice:
    """The smallest batch any rank chose, on every rank (the ranks' candidates are the same divisors, so it is one
    of them); the note says when this rank's was lowered. `reduce_max` is the collective (tests pass their own)."""
    agreed = int(round(-reduce_max(-float(choice.batch), device)))
    if agreed == choice.batch:
        return choice
    return BatchChoice(agreed, f"{choice.note}; lowered to {agreed}, the largest that every process's GPU fits")


def with_pending_note(plan: Plan, mode: str, device_setting: str, update_freq: Optional[int]) -> Plan:
    """`plan` with a note, for a dry run (nothing measured yet), when the run will fit its batch to the GPU.

    Args:
        mode: the batch_fit setting.
        device_setting: the device setting (auto | cpu | cuda); auto means CUDA when this machine has it.
        update_freq: the update_freq setting (None: auto).
    """
    cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
    if not batch_fit_wanted(mode, torch.device("cuda" if cuda else "cpu"), update_freq):
        return plan
    note = ("batch_fit auto: on CUDA the run measures a training step and uses the largest per-GPU batch that fits "
            "the GPU and divides effective batch / processes (fewer accumulation steps); effective batch and lr stay "
            "as shown (--batch_size or --batch_fit off keeps this plan)")
    return dataclasses.replace(plan, notes=plan.notes + (note,))
