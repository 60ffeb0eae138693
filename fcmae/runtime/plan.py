"""The plan of a run: how the recipe's effective batch is split over the processes, the lr and step counts.

The recipe fixes the effective (global) batch; the plan chooses the per-GPU
batch and the gradient accumulation (`update_freq`) so that

    per-GPU batch x world size x update_freq == effective batch

on any number of processes. With `update_freq: auto` (the default):

- the per-GPU batch is the configured `batch_size`, lowered where needed: to
  effective_batch / world_size when batch_size x world_size exceeds the
  effective batch (no accumulation), else to the largest size not above
  batch_size that divides the effective batch evenly over the processes;
- where no per-GPU batch fits exactly (the world size does not divide the
  effective batch), the plan stops with an error naming the settings to
  change.

An explicit `update_freq` is taken as given; the plan then says when the
effective batch differs from the target. The lr is blr x effective batch /
256 unless `lr` is set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from fcmae.runtime.errors import PlanError


@dataclass(frozen=True)
class Plan:
    """The derived numbers of a run (printed before training and saved in config.yaml)."""

    world_size: int
    batch_size: int  # per process and iteration, after fitting
    update_freq: int  # iterations per optimizer step
    effective_batch: int  # batch_size x world_size x update_freq
    target_batch: int  # the recipe's effective batch
    lr: float
    epochs: int
    warmup_epochs: int
    notes: Tuple[str, ...] = ()  # where and why the plan departs from the settings
    num_images: Optional[int] = None  # the rest is known once the data set is
    iters_per_epoch: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    total_steps: Optional[int] = None
    warmup_steps: Optional[int] = None

    @property
    def images_per_iter(self) -> int:
        return self.batch_size * self.world_size

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def fit_batch(batch_size: int, world_size: int, target: int) -> Tuple[int, int]:
    """(per-GPU batch, update_freq) with product x world_size == target, the batch as large as allowed.

    Raises PlanError when the world size does not divide the target.
    """
    if target % world_size:
        raise PlanError(
            f"the effective batch {target} cannot be split evenly over {world_size} processes: set "
            f"--effective_batch to a multiple of {world_size} (e.g. {target // world_size * world_size or world_size}"
            f"), run on a number of GPUs that divides {target}, or set --update_freq to accept "
            f"batch_size x {world_size} x update_freq as the effective batch")
    per_process = target // world_size
    for batch in range(min(batch_size, per_process), 0, -1):
        if per_process % batch == 0:
            return batch, per_process // batch
    raise AssertionError("unreachable: batch 1 always divides")


def make_plan(cfg, world_size: int, num_images: Optional[int] = None) -> Plan:
    """The plan for `world_size` processes (and the data set's size, when known).

    Args:
        cfg: a TrainConfig (batch_size, effective_batch, update_freq, blr, lr, epochs, warmup_epochs).
        world_size: the number of processes.
        num_images: the training set's size; None before the data is read (dry runs).
    """
    notes: List[str] = []
    target = cfg.effective_batch
    if cfg.update_freq is None:
        batch, update_freq = fit_batch(cfg.batch_size, world_size, target)
        if batch != cfg.batch_size:
            notes.append(f"per-GPU batch lowered from batch_size {cfg.batch_size} to {batch}, so that {batch} x "
                         f"{world_size} processes x {update_freq} = effective batch {target}")
    else:
        batch, update_freq = cfg.batch_size, cfg.update_freq
    effective = batch * world_size * update_freq
    if effective != target:
        notes.append(f"effective batch {effective} differs from the target {target} because update_freq is set "
                     f"to {update_freq}; use --update_freq auto to match it")
    lr = cfg.lr if cfg.lr is not None else cfg.blr * effective / 256
    plan = Plan(world_size, batch, update_freq, effective, target, lr, cfg.epochs, cfg.warmup_epochs, tuple(notes))
    if num_images is None:
        return plan
    if batch * world_size > num_images:
        raise PlanError(
            f"batch larger than the data set: per-GPU batch {batch} x {world_size} processes = "
            f"{batch * world_size} images per iteration, but the data set has only {num_images}; lower --batch_size")
    iters = (num_images // world_size // batch) // update_freq * update_freq
    if iters == 0:
        raise PlanError(
            f"the data set ({num_images} images) is smaller than one optimizer step ({effective} images = "
            f"per-GPU batch {batch} x {world_size} processes x update_freq {update_freq}); lower "
            "--effective_batch or --update_freq, or add data")
    steps = iters // update_freq
    return dataclasses.replace(plan, num_images=num_images, iters_per_epoch=iters, steps_per_epoch=steps,
                               total_steps=steps * cfg.epochs, warmup_steps=steps * cfg.warmup_epochs)


def plan_lines(cfg, plan: Plan, data: str, images: str = "images") -> List[str]:
    """The lines of a printed plan that both commands share (batch, lr, data, steps, output)."""
    lines = [
        f"  world size       {plan.world_size}",
        f"  per-GPU batch    {plan.batch_size}",
        f"  accumulation     {plan.update_freq}",
        f"  effective batch  {plan.effective_batch} (= {plan.batch_size} x {plan.world_size} x {plan.update_freq}; "
        f"target {plan.target_batch})",
        f"  lr               {plan.lr:.4g}" + ("" if cfg.lr is not None else
                                               f" (= blr {cfg.blr} x {plan.effective_batch} / 256)"),
    ]
    lines += [f"  note             {note}" for note in plan.notes]
    lines.append(f"  data             {data}" + (f" ({plan.num_images} {images})" if plan.num_images else ""))
    if plan.steps_per_epoch is not None:
        lines.append(f"  steps            {plan.steps_per_epoch} optimizer steps/epoch, "
                     f"{plan.total_steps} in all ({plan.warmup_steps} warmup)")
    lines.append(f"  output           {cfg.output_dir}")
    return lines


# ---------------------------------------------------------------- the lr schedule
# Linear warmup, then cosine decay to min_lr, per optimizer step. Param groups may carry an `lr_scale`
# (layer-wise decay in fine-tuning), which `set_lr` multiplies in.

def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """lr at optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly from base_lr/warmup_steps (step 0) to base_lr; the
    cosine then falls from base_lr to min_lr at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Set every param group's lr to lr * group's `lr_scale` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
