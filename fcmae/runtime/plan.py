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

On CUDA with `batch_fit: auto` the caller measures the device first and
passes a `BatchChoice` (fcmae.runtime.batch_fit): its batch, which divides
effective_batch / world_size, replaces batch_size above, so the accumulation
falls and the effective batch and the lr stay the recipe's; its note says why.

An explicit `update_freq` is taken as given; the plan then says when the
effective batch differs from the target. The lr is blr x effective batch /
256 unless `lr` is set.

Small data sets: with `update_freq: auto`, a data set smaller than one
optimizer step lowers the effective batch to what it holds (as few
iterations of at most the per-GPU batch as hold each process's share, of
equal size), and the plan says so.

Each epoch trains on whole batches only: the images of the last, partial
batch are left out (a different draw each epoch, as the order is shuffled),
and the plan counts them. `keep_last` (fine-tuning's `drop_last: false`)
trains on the partial batch too, when there is no gradient accumulation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    keep_last: bool = False  # each epoch's last, partial batch is trained on (drop_last false)
    images_per_epoch: Optional[int] = None  # samples trained on per epoch, all processes together

    @property
    def images_per_iter(self) -> int:
        return self.batch_size * self.world_size

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class BatchChoice:
    """The per-GPU batch chosen for the device (fcmae.runtime.batch_fit), and the plan's note on why."""

    batch: int
    note: str


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


def make_plan(cfg, world_size: int, num_images: Optional[int] = None, keep_last: bool = False,
              even_batches: bool = False, batch_choice: Optional[BatchChoice] = None) -> Plan:
    """The plan for `world_size` processes (and the data set's size, when known).

    Args:
        cfg: a TrainConfig (batch_size, effective_batch, update_freq, blr, lr, epochs, warmup_epochs).
        world_size: the number of processes.
        num_images: the training set's size; None when it is not known (the built-in demo's dry run).
        keep_last: train on each epoch's last, partial batch too (only without gradient accumulation).
        even_batches: every batch must hold an even number of images (Mixup/CutMix).
        batch_choice: the per-GPU batch measured to fit the device (with update_freq auto), in place of batch_size.
    """
    notes: List[str] = []
    target = cfg.effective_batch
    if cfg.update_freq is None:
        batch, update_freq = fit_batch(cfg.batch_size if batch_choice is None else batch_choice.batch, world_size,
                                       target)
        if batch_choice is not None:
            notes.append(batch_choice.note)
        elif batch != cfg.batch_size:
            notes.append(f"per-GPU batch lowered from batch_size {cfg.batch_size} to {batch}, so that {batch} x "
                         f"{world_size} processes x {update_freq} = effective batch {target}")
        if num_images is not None and num_images < target:
            batch, update_freq = _fit_small_data(batch, world_size, num_images, even_batches)
            notes.append(f"effective batch lowered from {target} to {batch * world_size * update_freq} (= {batch} x "
                         f"{world_size} x {update_freq}): the data set has only {num_images} images, fewer than one "
                         "optimizer step of the recipe; the lr follows it (small data sets have their own recipes: "
                         "docs/own-data.md)")
    else:
        batch, update_freq = cfg.batch_size, cfg.update_freq
    effective = batch * world_size * update_freq
    if effective != target and cfg.update_freq is not None:
        notes.append(f"effective batch {effective} differs from the target {target} because update_freq is set "
                     f"to {update_freq}; use --update_freq auto to match it")
    if keep_last and update_freq > 1:
        notes.append(f"drop_last false has no effect with gradient accumulation (update_freq {update_freq}): each "
                     "optimizer step takes whole batches, so each epoch's last, partial batch is left out")
        keep_last = False
    lr = cfg.lr if cfg.lr is not None else cfg.blr * effective / 256
    plan = Plan(world_size, batch, update_freq, effective, target, lr, cfg.epochs, cfg.warmup_epochs, tuple(notes),
                keep_last=keep_last)
    if num_images is None:
        return plan
    if batch * world_size > num_images:
        raise PlanError(
            f"batch larger than the data set: per-GPU batch {batch} x {world_size} processes = "
            f"{batch * world_size} images per iteration, but the data set has only {num_images}; lower --batch_size")
    if keep_last:
        per_process = -(-num_images // world_size)  # the sampler repeats a few images to give each the same share
        if even_batches:
            per_process -= per_process % 2  # the batch is even, so only the last one can be odd
        iters = -(-per_process // batch)
        trained = per_process * world_size
    else:
        iters = (num_images // world_size // batch) // update_freq * update_freq
        trained = iters * batch * world_size
    if iters == 0:
        raise PlanError(
            f"the data set ({num_images} images) is smaller than one optimizer step ({effective} images = "
            f"per-GPU batch {batch} x {world_size} processes x update_freq {update_freq}); lower "
            "--effective_batch or --update_freq, or add data")
    steps = iters // update_freq
    return dataclasses.replace(plan, num_images=num_images, iters_per_epoch=iters, steps_per_epoch=steps,
                               total_steps=steps * cfg.epochs, warmup_steps=steps * cfg.warmup_epochs,
                               images_per_epoch=trained)


def _fit_small_data(batch: int, world_size: int, num_images: int, even_batches: bool) -> Tuple[int, int]:
    """(per-GPU batch, update_freq) of the largest optimizer step a data set smaller than the recipe's step holds:
    as few iterations of at most `batch` images as hold each process's share, of equal size."""
    per_process = num_images // world_size
    iterations = -(-per_process // batch) if per_process else 1
    batch = per_process // iterations
    if even_batches:
        batch -= batch % 2
    if batch < 1:
        raise PlanError(f"the data set has {num_images} images: too few for {world_size} processes"
                        + (" with an even batch of 2 or more (Mixup/CutMix)" if even_batches else "")
                        + "; add data or use fewer processes")
    return batch, per_process // batch


def plan_lines(cfg, plan: Plan, data: str, images: str = "images", keep_hint: str = "",
               data_lines: Sequence[str] = ()) -> List[str]:
    """The lines of a printed plan that both commands share (batch, lr, data, images per epoch, steps, output).

    `keep_hint` tells how to train on the images each epoch leaves out (fine-tuning: `--drop_last false`);
    `data_lines` follow the data's (fine-tuning: the validation set).
    """
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
    if plan.images_per_epoch is not None:
        lines.append(f"  per epoch        {epoch_images(plan, keep_hint)}")
    lines += data_lines
    if plan.steps_per_epoch is not None:
        lines.append(f"  steps            {plan.steps_per_epoch} optimizer steps/epoch, "
                     f"{plan.total_steps} in all ({plan.warmup_steps} warmup)")
    lines.append(f"  output           {cfg.output_dir}")
    return lines


def epoch_images(plan: Plan, keep_hint: str = "") -> str:
    """What one epoch trains on: how many of the images, in how many batches, and how many it leaves out."""
    count, trained, per_batch = plan.num_images, plan.images_per_epoch, plan.images_per_iter
    iters = plan.iters_per_epoch
    batches = f"{iters} batch{'es' if iters > 1 else ''} of {per_batch}"
    if plan.keep_last:
        last = trained - (iters - 1) * per_batch
        text = f"{min(trained, count)} of {count} images in {batches}" + (f", the last of {last}" if last != per_batch
                                                                            else "")
        if trained > count:
            text += f"; {trained - count} image(s) twice, so that each of {plan.world_size} processes gets as many"
    else:
        text = f"{trained} of {count} images in {batches}"
    left_out = count - min(trained, count)
    if left_out:
        reason = "so that the last batch is even (Mixup/CutMix)" if plan.keep_last else "the last, partial batch"
        text += (f"; {left_out} left out each epoch ({reason}; a different draw each epoch, as the order is "
                 "shuffled)" + (f"; {keep_hint}" if keep_hint and not plan.keep_last else ""))
    return text


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


@dataclass(frozen=True)
class LoopSettings:
    """What the epoch loop needs from the config and the plan."""

    epochs: int
    iters_per_epoch: int  # a multiple of update_freq
    update_freq: int
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    images_per_iter: int  # global batch of one iteration
    amp: str
    print_every: int
    save_every: int
    keep_checkpoints: int
    clip_grad: Optional[float] = None
    exit_after_steps: Optional[int] = None  # behave as if pre-empted after this many optimizer steps (tests)
    images_per_epoch: Optional[int] = None  # samples trained on per epoch (a partial last batch's included)
    save_minutes: Optional[float] = None  # timed mid-epoch checkpoints (fcmae.runtime.timed_saves); None: off
    hang_minutes: Optional[float] = None  # the hang watchdog (fcmae.runtime.watchdog); None: off

    @classmethod
    def of(cls, cfg, plan: Plan) -> "LoopSettings":
        """From a TrainConfig and the plan of its data set."""
        return cls(cfg.epochs, plan.iters_per_epoch, plan.update_freq, plan.lr, cfg.min_lr, plan.warmup_steps,
                   plan.total_steps, plan.images_per_iter, cfg.amp, cfg.print_every, cfg.save_every,
                   cfg.keep_checkpoints, cfg.clip_grad, cfg.exit_after_steps, plan.images_per_epoch,
                   save_minutes=cfg.save_minutes, hang_minutes=cfg.hang_minutes)
