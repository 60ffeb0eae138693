"""One epoch of fine-tuning, and evaluation (top-1 / top-5, exact over all processes).

Steps are counted as in pre-training (fcmae/engine.py): an iteration is one
batch per process, an optimizer step every `update_freq` iterations; the lr
is set per optimizer step, and checkpoints and stop checks happen only at
optimizer-step boundaries, so a resumed run continues with the same state.
"""

import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional

import torch

from fcmae import distributed
from fcmae.engine import LoopConfig, NonFiniteLossError, RunState, autocast_context
from fcmae.lr_sched import cosine_lr, set_lr


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler],
    state: RunState,
    loop: LoopConfig,
    device: torch.device,
    amp: str,
    stop,  # fcmae.signals.StopRequest
    save: Callable[[], Any],
    progress,  # fcmae.logging_utils.ProgressMeter
    on_log: Callable[[Dict[str, float]], None],
    mixup=None,  # timm.data.Mixup or None
    ema=None,  # timm.utils.ModelEmaV3 or None
) -> bool:
    """Run the rest of epoch `state.epoch` from `state.iteration`; False when a stop was requested."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    uf = loop.update_freq
    lr = cosine_lr(state.step, loop.total_steps, loop.warmup_steps, loop.lr, loop.min_lr)
    for images, targets in loader:
        if state.iteration >= loop.iters_per_epoch:
            break
        if state.iteration % uf == 0:
            lr = cosine_lr(state.step, loop.total_steps, loop.warmup_steps, loop.lr, loop.min_lr)
            set_lr(optimizer, lr)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        boundary = (state.iteration + 1) % uf == 0
        sync = model.no_sync() if (not boundary and hasattr(model, "no_sync")) else nullcontext()
        with sync:
            with autocast_context(device, amp):
                loss = criterion(model(images), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value} at epoch {state.epoch + 1}, iteration "
                                         f"{state.iteration} (optimizer step {state.step + 1}); training stopped")
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
        if ema is not None:
            ema.update(model, step=state.step)

        if state.iteration % (loop.print_every * uf) == 0 or state.iteration == loop.iters_per_epoch:
            mean_loss = distributed.all_reduce_mean(loss_value, device if device.type == "cuda" else None)
            rates = progress.line(state.epoch, loop.epochs, state.iteration, loop.iters_per_epoch,
                                  state.epoch * loop.iters_per_epoch + state.iteration,
                                  {"loss": mean_loss, "lr": lr})
            on_log({"epoch": state.epoch, "iteration": state.iteration, "step": state.step, "loss": mean_loss,
                    "lr": lr, "images_per_s": rates["images_per_s"], "time": time.time()})

        if loop.exit_after_steps is not None and state.step >= loop.exit_after_steps:
            stop.request()
        if stop.should_stop(device if device.type == "cuda" else None):
            if state.iteration < loop.iters_per_epoch:
                save()
            return False
    return True


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off") -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole (sharded) validation set."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack([
            torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, :1].any(dim=1).sum().double(),
            hits.any(dim=1).sum().double(),
            torch.tensor(float(len(targets)), dtype=torch.float64, device=device),
        ])
    if distributed.is_dist():
        if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
            sums = sums.cuda()
        torch.distributed.all_reduce(sums)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss / count, "count": int(count)}
