"""The training loop both commands share: one `Trainer`, one epoch loop.

A command builds its data, model and optimizer, then (as in main_pretrain.py):

    trainer = Trainer(model, optimizer, loss_fn, LoopSettings.of(cfg, plan), info, cfg.output_dir,
                      cfg.log_dir, cfg.to_dict(), scaler=grad_scaler(device, cfg.amp))
    trainer.restore(saved, path, cfg.seed)           # when resuming
    finished = trainer.fit(loader, end_epoch)        # False when stopped by a signal

The loop counts two kinds of steps:
- iterations: one batch through the model per process;
- optimizer steps (`step`): one every `update_freq` iterations (gradient
  accumulation). The lr is set per optimizer step; checkpoints are taken
  only at optimizer-step boundaries, so a resumed run continues with exactly
  the same state.

A stop (SIGTERM / SIGUSR1, fcmae.runtime.signals) is seen after the
iteration during which it arrived. Between boundaries the run goes back to
the last one (the partial gradients are dropped; the RNG state and epoch
loss sums of the boundary are kept for this), so the checkpoint is written
at once, not `update_freq` iterations later. A stop in an epoch's last
iteration is saved before the epoch's evaluation (`end_epoch`), which the
resumed run then does. The process then exits 0; under SLURM with
`--requeue`, rank 0 first requeues the job (fcmae/runtime/slurm.py).

`should_stop` is the one place where the processes agree on stopping (one
all-reduce per iteration, only with several processes); further reasons to
stop go there.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime import distributed, slurm
from fcmae.runtime.logs import JsonlLogger, ProgressMeter, TensorBoard, log
from fcmae.runtime.plan import Plan
from fcmae.runtime.schedule import cosine_lr, set_lr
from fcmae.runtime.signals import STOP, StopRequest, ignore_stop_signals


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (plain types only)."""

    epoch: int = 0  # current epoch (0-based)
    iteration: int = 0  # next iteration to run within the epoch
    step: int = 0  # optimizer steps done in the whole run
    epoch_loss_sum: float = 0.0  # running sum of this process's losses this epoch
    epoch_loss_count: int = 0
    history: list = field(default_factory=list)  # per-epoch summaries

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


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

    @classmethod
    def of(cls, cfg, plan: Plan) -> "LoopSettings":
        """From a TrainConfig and the plan of its data set."""
        return cls(cfg.epochs, plan.iters_per_epoch, plan.update_freq, plan.lr, cfg.min_lr, plan.warmup_steps,
                   plan.total_steps, plan.images_per_iter, cfg.amp, cfg.print_every, cfg.save_every,
                   cfg.keep_checkpoints, cfg.clip_grad, cfg.exit_after_steps)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (callers add the rank so processes differ)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def autocast_context(device: torch.device, amp: str):
    """bf16 / fp16 autocast on CUDA; nothing on CPU or when amp is off."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def precision_note(device: torch.device, amp: str) -> Optional[str]:
    """The line that says a requested mixed precision has no effect (on CPU), or None."""
    if device.type != "cuda" and amp != "off":
        return f"note: --amp {amp} has no effect on {device.type}; training in fp32"
    return None


def grad_scaler(device: torch.device, amp: str) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for fp16 on CUDA; None otherwise (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda") if (device.type == "cuda" and amp == "fp16") else None


def train_loader(dataset, plan: Plan, num_workers: int, seed: int, info: distributed.DistInfo,
                 collate_fn=None) -> DataLoader:
    """This process's shard of the training set, in an order that resumes mid-epoch."""
    from fcmae.data import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(dataset, plan.batch_size, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=seed)
    sampler.max_batches = plan.iters_per_epoch
    return DataLoader(dataset, batch_size=plan.batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", drop_last=True, collate_fn=collate_fn,
                      generator=torch.Generator(),  # keeps the global RNG untouched by the loader
                      worker_init_fn=ignore_stop_signals)  # the main process alone decides when to stop


class Trainer:
    """Model, optimizer, scaler, run state and loop settings of one training run.

    Args:
        model: the model without DDP (the trainer wraps it when there are several processes).
        optimizer: its optimizer; param groups may carry `lr_scale` (layer decay).
        loss_fn: (model, batch) -> loss; moves the batch to the device, runs under autocast.
        settings: the loop's numbers (LoopSettings.of(cfg, plan)).
        info: this process's place in the process group.
        output_dir: checkpoints and log.jsonl go here.
        log_dir: TensorBoard's folder.
        config: the run's config as plain types, stored in every checkpoint.
        scaler: the fp16 loss scaler, or None.
        after_step: (model, step) after each optimizer step (fine-tuning's EMA update).
        extra_state: () -> dict of the command's own checkpoint entries.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], settings: LoopSettings,
                 info: distributed.DistInfo, output_dir, log_dir, config: Dict[str, Any],
                 scaler: Optional[torch.amp.GradScaler] = None,
                 after_step: Optional[Callable[[torch.nn.Module, int], None]] = None,
                 extra_state: Optional[Callable[[], Dict[str, Any]]] = None):
        self.model, self.optimizer, self.loss_fn, self.settings = model, optimizer, loss_fn, settings
        self.info, self.device = info, info.device
        self.output_dir, self.log_dir, self.config = Path(output_dir), log_dir, config
        self.scaler, self.after_step, self.extra_state = scaler, after_step, extra_state
        self.state = RunState()
        # The process's stop request when a command installed it before its imports; else (in-process
        # callers such as tests) one of this trainer's own, installed while fit() runs.
        self.stop = STOP if STOP.installed else StopRequest()
        self.jsonl: Optional[JsonlLogger] = None  # set while fit() runs
        self.tb: Optional[TensorBoard] = None
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.ddp_model = model

    # ------------------------------------------------------------ checkpoints
    def restore(self, saved: Dict[str, Any], path, seed: int) -> None:
        """Load model, optimizer, scaler, run state and this process's RNG state from a checkpoint."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state = RunState(**saved["run_state"])
        rngs = saved.get("rng") or []
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        else:
            log(f"note: the checkpoint has RNG states of {len(rngs)} processes, this run has "
                f"{self.info.world_size}; reseeding")
            torch.manual_seed(seed + self.info.rank + 1_000_003 * self.state.step)
        if self.state.epoch >= self.settings.epochs:
            log(f"resumed from {path}: all {self.state.epoch} epochs done, step {self.state.step}")
        else:
            log(f"resumed from {path}: epoch {self.state.epoch + 1}, iteration {self.state.iteration}, "
                f"step {self.state.step}")

    def save(self, epoch_done: Optional[int] = None) -> None:
        """The checkpoint of the run as it stands (called on every rank; rank 0 writes)."""
        rngs = [ckpt.rng_state()]
        if distributed.is_dist():
            rngs = [None] * self.info.world_size
            torch.distributed.all_gather_object(rngs, ckpt.rng_state())
        if self.info.is_main:
            payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                       "epoch": self.state.epoch, "step": self.state.step, "run_state": self.state.as_dict(),
                       "rng": rngs, "config": self.config, "world_size": self.info.world_size,
                       **(self.extra_state() if self.extra_state is not None else {})}
            ckpt.save_checkpoint(payload, self.output_dir, epoch_done=epoch_done,
                                 save_every=self.settings.save_every, keep=self.settings.keep_checkpoints)
        distributed.barrier()

    # ------------------------------------------------------------ the run
    def should_stop(self) -> bool:
        """True on every rank once any rank was asked to stop (one all-reduce per call with several processes)."""
        s = self.settings
        if s.exit_after_steps is not None and self.state.step >= s.exit_after_steps:
            self.stop.request()
        local = 1.0 if self.stop.received is not None else 0.0
        return distributed.all_reduce_max(local, self._reduce_device()) > 0

    def _reduce_device(self) -> Optional[torch.device]:
        return self.device if self.device.type == "cuda" else None

    def fit(self, loader: DataLoader, end_epoch: Callable[[float], None]) -> bool:
        """Train from `self.state` to the last epoch; False when stopped by a signal (a checkpoint is saved).

        After each epoch `end_epoch(mean train loss over processes)` writes the
        command's summary (self.jsonl and self.tb are open), then the state
        moves to the next epoch and the epoch checkpoint is saved. A stop is
        saved before `end_epoch`. log.jsonl records after the resumed step are
        dropped first.
        """
        main, s = self.info.is_main, self.settings
        self.jsonl = JsonlLogger(self.output_dir / "log.jsonl", enabled=main)
        self.jsonl.truncate_after("step", self.state.step)
        self.tb = TensorBoard(self.log_dir, enabled=main, purge_step=self.state.step or None)
        progress = ProgressMeter(s.epochs * s.iters_per_epoch, s.images_per_iter,
                                 start_step=self.state.epoch * s.iters_per_epoch + self.state.iteration, enabled=main)
        installed_here = not self.stop.installed
        self.stop.install()
        try:
            while self.state.epoch < s.epochs:
                loader.sampler.set_epoch(self.state.epoch, start_batch=self.state.iteration)
                loader.dataset.set_epoch(self.state.epoch)
                if not self.train_one_epoch(loader, progress):
                    self._stop_and_save()
                    return False
                local = self.state.epoch_loss_sum / max(self.state.epoch_loss_count, 1)
                end_epoch(distributed.all_reduce_mean(local, self._reduce_device()))
                self.state.epoch += 1
                self.state.iteration = 0
                self.state.epoch_loss_sum, self.state.epoch_loss_count = 0.0, 0
                self.save(epoch_done=self.state.epoch)
        except NonFiniteLossError as e:
            last = ckpt.find_latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"{e}. The last good checkpoint ({last or 'none yet'}) is kept; lower the learning rate "
                "(--blr) or use --amp bf16/off, then run again to resume from it") from None
        finally:
            if installed_here:  # installed by a command's early set-up it stays until the process exits
                self.stop.restore()
            self.tb.close()
        return True

    def train_one_epoch(self, loader, progress: ProgressMeter) -> bool:
        """The rest of epoch `state.epoch` from `state.iteration`; False when a stop was requested."""
        model, state, s = self.ddp_model, self.state, self.settings
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = cosine_lr(state.step, s.total_steps, s.warmup_steps, s.lr, s.min_lr)
        last_boundary = None  # what a stop between optimizer steps goes back to
        for batch in loader:
            if state.iteration >= s.iters_per_epoch:
                break
            if state.iteration % s.update_freq == 0:
                lr = cosine_lr(state.step, s.total_steps, s.warmup_steps, s.lr, s.min_lr)
                set_lr(self.optimizer, lr)
                if s.update_freq > 1:
                    last_boundary = (state.iteration, state.epoch_loss_sum, state.epoch_loss_count, ckpt.rng_state())
            boundary = (state.iteration + 1) % s.update_freq == 0
            sync = model.no_sync() if (not boundary and hasattr(model, "no_sync")) else nullcontext()
            with sync:
                with autocast_context(self.device, s.amp):
                    loss = self.loss_fn(model, batch)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at epoch {state.epoch + 1}, iteration {state.iteration} "
                        f"(optimizer step {state.step + 1}); training stopped")
                loss = loss / s.update_freq
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            state.epoch_loss_sum += loss_value
            state.epoch_loss_count += 1
            state.iteration += 1
            if boundary:
                self._optimizer_step()
                if state.iteration % (s.print_every * s.update_freq) == 0 or state.iteration == s.iters_per_epoch:
                    self._log_progress(progress, loss_value, lr)
            if self.should_stop():
                if not boundary:
                    self._back_to(last_boundary)
                return False
        return True

    def _back_to(self, boundary) -> None:
        """Drop the iterations since the last optimizer step (their gradients, RNG draws and losses)."""
        state = self.state
        state.iteration, state.epoch_loss_sum, state.epoch_loss_count, rng = boundary
        ckpt.set_rng_state(rng)
        self.optimizer.zero_grad(set_to_none=True)

    def _stop_and_save(self) -> None:
        """Save the stopped run (every rank), say so, and under SLURM let rank 0 requeue the job."""
        self.save()
        log(f"stopped by {self.stop.signal_name or 'request'} at epoch {self.state.epoch + 1}, iteration "
            f"{self.state.iteration}, step {self.state.step}; checkpoint saved in {self.output_dir}. Run the same "
            "command again to resume.")
        if self.info.is_main and self.stop.received is not None:
            note = slurm.requeue_if_running(os.environ)
            if note:
                log(note)

    def _optimizer_step(self) -> None:
        clip = self.settings.clip_grad
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.after_step is not None:
            self.after_step(self.model, self.state.step)

    def _log_progress(self, progress: ProgressMeter, loss_value: float, lr: float) -> None:
        """A progress line, a log.jsonl record and TensorBoard scalars (rank 0) of the loss over processes."""
        state, s = self.state, self.settings
        mean_loss = distributed.all_reduce_mean(loss_value, self._reduce_device())
        rates = progress.line(state.epoch, s.epochs, state.iteration, s.iters_per_epoch,
                              state.epoch * s.iters_per_epoch + state.iteration, {"loss": mean_loss, "lr": lr})
        record = {"epoch": state.epoch, "iteration": state.iteration, "step": state.step, "loss": mean_loss,
                  "lr": lr, "images_per_s": rates["images_per_s"], "time": time.time()}
        self.jsonl.write({"type": "train", **record})
        self.tb.scalars({"loss": mean_loss, "lr": lr, "images_per_s": rates["images_per_s"]}, state.step,
                        prefix="train/")
