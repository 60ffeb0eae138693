"""One epoch of training, and the checkpoint state of a run.

Pre-training and fine-tuning share this loop; they differ only in how a
batch's loss is computed (`loss_fn`) and in what follows an optimizer step
(`after_step`: fine-tuning's EMA update).

The loop counts two kinds of steps:
- iterations: one batch through the model per process;
- optimizer steps (`step`): one every `update_freq` iterations (gradient
  accumulation). The learning rate is set per optimizer step; checkpoints
  and the stop check happen only at optimizer-step boundaries, so a resumed
  run continues with exactly the same state.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from fcmae import distributed
from fcmae.lr_sched import cosine_lr, set_lr


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    iteration: int = 0  # next iteration to run within the epoch
    step: int = 0  # optimizer steps done in the whole run
    epoch_loss_sum: float = 0.0  # running sum of this process's losses this epoch
    epoch_loss_count: int = 0
    history: list = field(default_factory=list)  # per-epoch summaries

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoopConfig:
    epochs: int
    iters_per_epoch: int  # iterations per epoch, a multiple of update_freq
    update_freq: int
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    images_per_iter: int  # global batch of one iteration
    print_every: int = 20
    clip_grad: Optional[float] = None
    exit_after_steps: Optional[int] = None  # simulate a pre-emption after this many optimizer steps (tests)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW; no weight decay on biases, 1-d parameters (norms, GRN gamma/beta) and model.no_weight_decay()."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def autocast_context(device: torch.device, amp: str):
    """bf16 / fp16 autocast on CUDA; nothing on CPU or when amp is off."""
    if device.type != "cuda" or amp in (None, "off", "none", False, "fp32"):
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for fp16 on CUDA; None otherwise (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda") if (device.type == "cuda" and amp == "fp16") else None


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],  # (model, batch) -> loss, run under autocast
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler],
    state: RunState,
    loop: LoopConfig,
    device: torch.device,
    amp: str,
    stop,  # fcmae.signals.StopRequest
    save: Callable[[], Any],  # writes a checkpoint of the current state (mid-epoch)
    progress,  # fcmae.logging_utils.ProgressMeter
    on_log: Callable[[Dict[str, float]], None],
    after_step: Optional[Callable[[torch.nn.Module, int], None]] = None,  # (model, step) after each optimizer step
) -> bool:
    """Run the rest of epoch `state.epoch` from `state.iteration`.

    `loss_fn` moves the batch to `device` and returns the loss; it runs under
    autocast, which leaves data movement and Mixup untouched. Returns False
    when a stop was requested (after saving a checkpoint if the epoch is not
    finished), True otherwise.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    uf = loop.update_freq
    reduce_on = device if device.type == "cuda" else None
    lr = cosine_lr(state.step, loop.total_steps, loop.warmup_steps, loop.lr, loop.min_lr)
    for batch in loader:
        if state.iteration >= loop.iters_per_epoch:
            break
        if state.iteration % uf == 0:
            lr = cosine_lr(state.step, loop.total_steps, loop.warmup_steps, loop.lr, loop.min_lr)
            set_lr(optimizer, lr)
        boundary = (state.iteration + 1) % uf == 0
        sync = model.no_sync() if (not boundary and hasattr(model, "no_sync")) else nullcontext()
        with sync:
            with autocast_context(device, amp):
                loss = loss_fn(model, batch)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss is {loss_value} at epoch {state.epoch + 1}, iteration {state.iteration} "
                    f"(optimizer step {state.step + 1}); training stopped"
                )
            loss = loss / uf
            (scaler.scale(loss) if scaler is not None else loss).backward()
        state.epoch_loss_sum += loss_value
        state.epoch_loss_count += 1
        state.iteration += 1
        if not boundary:
            continue

        if scaler is not None:
            if loop.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), loop.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            if loop.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), loop.clip_grad)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if after_step is not None:
            after_step(model, state.step)

        if state.iteration % (loop.print_every * uf) == 0 or state.iteration == loop.iters_per_epoch:
            mean_loss = distributed.all_reduce_mean(loss_value, reduce_on)
            rates = progress.line(state.epoch, loop.epochs, state.iteration, loop.iters_per_epoch,
                                  state.epoch * loop.iters_per_epoch + state.iteration,
                                  {"loss": mean_loss, "lr": lr})
            on_log({"epoch": state.epoch, "iteration": state.iteration, "step": state.step,
                    "loss": mean_loss, "lr": lr, "images_per_s": rates["images_per_s"], "time": time.time()})

        if loop.exit_after_steps is not None and state.step >= loop.exit_after_steps:
            stop.request()
        if stop.should_stop(reduce_on):
            if state.iteration < loop.iters_per_epoch:
                save()  # mid-epoch; at the end of an epoch the caller saves the epoch checkpoint
            return False
    return True
