"""The training loop both commands share: one `Trainer`, one epoch loop.

A command builds its data, model, optimizer and step function, then:

    trainer = Trainer(model, optimizer, step_fn, LoopSettings.of(cfg, plan), info, cfg.output_dir,
                      cfg.log_dir, cfg.to_dict(), scaler=grad_scaler(device, cfg.amp), bad_inputs=tracker)
    trainer.restore(saved, path, cfg.seed)           # when resuming
    finished = trainer.fit(loader, end_epoch)        # False when stopped by a signal

One iteration (`train_one_epoch`): the lr of the optimizer step, the batch's
unreadable files counted, `step_fn(model, inputs)` under autocast, backward;
every `update_freq` iterations an optimizer step; then the processes agree
whether to stop, and whether a timed checkpoint is due
(fcmae.runtime.stepping.StopAgreement, fcmae.runtime.timed_saves: rank 0
writes it in the background). Each iteration also tells the hang watchdog
that training goes on (fcmae.runtime.watchdog).

The loop counts two kinds of steps:
- iterations: one batch through the model per process;
- optimizer steps (`step`): one every `update_freq` iterations (gradient
  accumulation). The lr is set per optimizer step; checkpoints are taken
  only at optimizer-step boundaries, so a resumed run continues with exactly
  the same state.

A stop (SIGTERM / SIGUSR1, or a first Ctrl-C while `fit` runs:
fcmae.runtime.signals) is seen after the iteration during which it arrived;
the run goes back to the last optimizer step (AccumulationWindow) and saves
at once. A stop in an epoch's last iteration is saved before the epoch's
evaluation (`end_epoch`), which the resumed run then does. The process exits
0 (130 after a Ctrl-C); under SLURM with `--requeue`, rank 0 first requeues
the job (fcmae.runtime.launch.slurm). A failed evaluation (an unreadable
validation image) saves the same checkpoint before the error leaves.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader

from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime import distributed
from fcmae.runtime.device import autocast_context
from fcmae.runtime.errors import CheckpointError, NonFiniteLossError
from fcmae.runtime.launch import slurm
from fcmae.runtime.loader import start_epoch
from fcmae.runtime.logs import JsonlLogger, ProgressMeter, TensorBoard, log
from fcmae.runtime.plan import LoopSettings, cosine_lr, set_lr
from fcmae.runtime.resume import RunState
from fcmae.runtime.signals import STOP, STOP_SIGNALS, StopRequest
from fcmae.runtime.stepping import AccumulationWindow, StopAgreement
from fcmae.runtime.timed_saves import BackgroundWriter, HostSnapshot, SaveClock
from fcmae.runtime.watchdog import HangWatchdog


class Trainer:
    """Model, optimizer, scaler, run state and loop settings of one training run.

    Args:
        model: the model without DDP (the trainer wraps it when there are several processes).
        optimizer: its optimizer; param groups may carry `lr_scale` (layer decay).
        step_fn: (model, inputs) -> loss: moves the inputs to the device and runs the model (under autocast).
        settings: the loop's numbers (LoopSettings.of(cfg, plan)).
        info: this process's place in the process group.
        output_dir: checkpoints and log.jsonl go here.
        log_dir: TensorBoard's folder.
        config: the run's config as plain types, stored in every checkpoint.
        scaler: the fp16 loss scaler, or None.
        after_step: (model, step) after each optimizer step (fine-tuning's EMA update).
        extra_state: () -> dict of the command's own checkpoint entries.
        compile_fn: model -> the module the loop runs (torch.compile'd; fcmae.runtime.device.compile_model),
            applied before DDP wraps it; checkpoints keep `model`'s plain parameter names.
        bad_inputs: counts the unreadable files each batch skipped and stops the run when there are too many
            (fcmae.data.folder.BadImageTracker: `report(bad, fail)`), or None.
        is_best_epoch: () -> whether the epoch `end_epoch` just evaluated is the best so far (the same on every
            rank); its checkpoint is then also kept as checkpoint-best.pth. None: no such file.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 step_fn: Callable[[torch.nn.Module, Any], torch.Tensor], settings: LoopSettings,
                 info: distributed.DistInfo, output_dir, log_dir, config: Dict[str, Any],
                 scaler: Optional[torch.amp.GradScaler] = None,
                 after_step: Optional[Callable[[torch.nn.Module, int], None]] = None,
                 extra_state: Optional[Callable[[], Dict[str, Any]]] = None,
                 compile_fn: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                 bad_inputs=None, is_best_epoch: Optional[Callable[[], bool]] = None):
        self.model, self.optimizer, self.step_fn, self.settings = model, optimizer, step_fn, settings
        self.info, self.device = info, info.device
        self.output_dir, self.log_dir, self.config = Path(output_dir), log_dir, config
        self.scaler, self.after_step, self.extra_state = scaler, after_step, extra_state
        self.bad_inputs, self.is_best_epoch = bad_inputs, is_best_epoch
        self.state = RunState()
        # The process's stop request when a command installed it before its imports; else (in-process
        # callers such as tests) one of this trainer's own, installed while fit() runs.
        self.stop = STOP if STOP.installed else StopRequest()
        self.agreement = StopAgreement(info, self.stop, settings.exit_after_steps)
        # Timed checkpoints: rank 0's clock, agreed on in the step's all-reduce; rank 0 writes in the background.
        self.save_clock = SaveClock(settings.save_minutes)
        self.agreement.save_due = self.save_clock.due
        self.writer, self.snapshot = BackgroundWriter(), HostSnapshot()
        self.watchdog = HangWatchdog(settings.hang_minutes, self.output_dir, info.rank)  # runs while fit() does
        self.jsonl: Optional[JsonlLogger] = None  # set while fit() runs
        self.tb: Optional[TensorBoard] = None
        # The last epoch's training in this process (`fit`): {"seconds", "images_per_s"}; end_epoch reads it.
        self.epoch_timing: Dict[str, float] = {}
        runner = compile_fn(model) if compile_fn is not None else model
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(runner, device_ids=device_ids)
        else:
            self.ddp_model = runner

    # ------------------------------------------------------------ checkpoints
    def restore(self, saved: Dict[str, Any], path, seed: int) -> None:
        """Load model, optimizer, scaler, run state and this process's RNG state and epoch loss from a checkpoint.

        Every rank must restore the same checkpoint (commands pick it with
        fcmae.runtime.resume.resume_checkpoint); a CheckpointError on every
        rank when their steps differ.
        """
        self.model.load_state_dict(saved["model"])
        # The saved param groups replace the built ones, implementation flags included: keep this run's
        # (a checkpoint of a fused CUDA AdamW resumed on CPU, or the reverse).
        built = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, flags in zip(self.optimizer.param_groups, built):
            group.update(flags)
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state = RunState(**saved["run_state"])
        steps = distributed.all_gather_object((self.state.step, str(path)))
        if len({step for step, _ in steps}) > 1:
            raise CheckpointError(
                "the processes resumed different checkpoints: " + ", ".join(
                    f"rank {rank} step {step} ({where})" for rank, (step, where) in enumerate(steps))
                + "; the output directory must be one folder that every node sees")
        rngs = saved.get("rng") or []
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        else:
            log(f"note: the checkpoint has RNG states of {len(rngs)} processes, this run has "
                f"{self.info.world_size}; reseeding")
            torch.manual_seed(seed + self.info.rank + 1_000_003 * self.state.step)
        # Each rank's own running epoch loss (run_state holds rank 0's); another world size gets their mean.
        sums = saved.get("epoch_loss") or []
        if len(sums) == self.info.world_size:
            self.state.epoch_loss_sum, self.state.epoch_loss_count = sums[self.info.rank]
        elif sums:
            self.state.epoch_loss_sum = sum(total for total, _ in sums) / len(sums)
        if self.state.epoch >= self.settings.epochs:
            log(f"resumed from {path}: all {self.state.epoch} epochs done, step {self.state.step}")
        else:
            log(f"resumed from {path}: epoch {self.state.epoch + 1}, iteration {self.state.iteration}, "
                f"step {self.state.step}")

    def save(self, epoch_done: Optional[int] = None, best: bool = False, background: bool = False) -> None:
        """The checkpoint of the run as it stands (called on every rank; rank 0 writes), also as
        checkpoint-best.pth when `best`.

        `background` (timed checkpoints): rank 0 copies the state to host memory and writes the file in a
        thread (fcmae.runtime.timed_saves). Any save first waits for the write in flight, whose error (a full
        disk) leaves here.
        """
        error = self.writer.wait()
        if error is not None:
            raise error
        per_rank = distributed.all_gather_object(
            (ckpt.rng_state(), [self.state.epoch_loss_sum, self.state.epoch_loss_count]))
        if self.info.is_main:
            payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                       "epoch": self.state.epoch, "step": self.state.step, "run_state": self.state.as_dict(),
                       "rng": [rng for rng, _ in per_rank], "epoch_loss": [loss for _, loss in per_rank],
                       "config": self.config, "world_size": self.info.world_size,
                       **(self.extra_state() if self.extra_state is not None else {})}
            if background:
                snapshot = self.snapshot.take(payload)
                self.writer.start(lambda: ckpt.save_checkpoint(snapshot, self.output_dir))
            else:
                ckpt.save_checkpoint(payload, self.output_dir, epoch_done=epoch_done,
                                     save_every=self.settings.save_every, keep=self.settings.keep_checkpoints,
                                     best=best)
        self.save_clock.saved()
        if not background:
            distributed.barrier()

    # ------------------------------------------------------------ the run
    def fail_at_next_check(self, error: Exception) -> None:
        """Stop every rank at the next check with `error` (StopAgreement.fail_at_next_check)."""
        self.agreement.fail_at_next_check(error)


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
        self.stop.saving = True  # a Ctrl-C from now on stops at the next iteration and saves (fcmae.runtime.signals)
        self.watchdog.start()
        try:
            while self.state.epoch < s.epochs:
                started, first_iteration = time.perf_counter(), self.state.iteration
                start_epoch(loader, self.state.epoch, self.state.iteration)
                if not self.train_one_epoch(loader, progress):
                    self._stop_and_save()
                    return False
                self._time_epoch(time.perf_counter() - started, first_iteration)
                local = self.state.epoch_loss_sum / max(self.state.epoch_loss_count, 1)
                self.watchdog.beat()  # the epoch's end has hang_minutes of its own
                self._end_epoch(end_epoch, distributed.all_reduce_mean(local, self.agreement.reduce_device()))
                self.state.epoch += 1
                self.state.iteration = 0
                self.state.epoch_loss_sum, self.state.epoch_loss_count = 0.0, 0
                self.save(epoch_done=self.state.epoch,
                          best=self.is_best_epoch is not None and self.is_best_epoch())
                self.watchdog.beat()
        except NonFiniteLossError as e:
            last = ckpt.find_latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"{e}. The last good checkpoint ({last or 'none yet'}) is kept; lower the learning rate "
                "(--blr) or use --amp bf16/off, then run again to resume from it") from None
        finally:
            self.watchdog.stop()
            self.stop.saving = False
            if installed_here:  # installed by a command's early set-up it stays until the process exits
                self.stop.restore()
            self.tb.close()
            error = self.writer.wait()  # a timed checkpoint still being written
            if error is not None and sys.exc_info()[1] is None:  # else the error on its way out is the one to report
                raise error
        return True

    def train_one_epoch(self, loader, progress: ProgressMeter) -> bool:
        """The rest of epoch `state.epoch` from `state.iteration`; False when a stop was requested.

        The loader yields (inputs, bad): `bad` lists the unreadable files that
        were skipped for this batch (counted by `bad_inputs`), `inputs` goes to
        `step_fn`.
        """
        model, state, s = self.ddp_model, self.state, self.settings
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        window = AccumulationWindow(s.update_freq)
        lr = cosine_lr(state.step, s.total_steps, s.warmup_steps, s.lr, s.min_lr)
        step_losses = []  # this optimizer step's micro-batch losses (on the device)
        for inputs, bad in loader:
            if state.iteration >= s.iters_per_epoch:
                break
            if window.opens_at(state.iteration):
                lr = cosine_lr(state.step, s.total_steps, s.warmup_steps, s.lr, s.min_lr)
                set_lr(self.optimizer, lr)
                window.open(state)
            if bad and self.bad_inputs is not None:
                self.bad_inputs.report(bad, self.fail_at_next_check)
            boundary = window.closes_at(state.iteration)
            step_losses.append(self._forward_backward(model, inputs, boundary))
            state.iteration += 1
            if boundary:
                self._optimizer_step()
            failed_write = self.writer.failure()  # a timed checkpoint that could not be written stops every rank
            if failed_write is not None:
                self.fail_at_next_check(failed_write)
            # before the progress line, which a non-finite loss must not reach
            stop = self.agreement.check(state, state.step, boundary)
            self.watchdog.beat()
            if boundary:
                if state.iteration % (s.print_every * s.update_freq) == 0 or state.iteration == s.iters_per_epoch:
                    self._log_progress(progress, torch.stack(step_losses).mean(), lr)
                step_losses = []
            if stop:
                if not boundary:
                    window.roll_back(state, self.optimizer, self.agreement)
                return False
            if self.agreement.save_now and state.iteration < s.iters_per_epoch:  # the epoch's own save is next
                self._timed_save()
        return True

    def _timed_save(self) -> None:
        """A timed checkpoint (checkpoint-last.pth) at this optimizer-step boundary, written in the background."""
        started = time.perf_counter()
        self.save(background=True)
        log(f"timed checkpoint at epoch {self.state.epoch + 1}, step {self.state.step} (save_minutes "
            f"{self.settings.save_minutes:g}); the step waited {time.perf_counter() - started:.2f} s, the file is "
            "written in the background")

    def _forward_backward(self, model: torch.nn.Module, inputs, boundary: bool) -> torch.Tensor:
        """One micro-batch: the step function under autocast, then the scaled backward; returns the loss.

        Between optimizer steps DDP skips its gradient all-reduce (`no_sync`).
        The loss is checked later, with the other ranks' (StopAgreement): no host sync here.
        """
        s, state = self.settings, self.state
        sync = model.no_sync() if (not boundary and hasattr(model, "no_sync")) else nullcontext()
        with sync:
            with autocast_context(self.device, s.amp):
                loss = self.step_fn(model, inputs)
            value = self.agreement.record(loss, state.epoch, state.iteration, state.step + 1)
            loss = loss / s.update_freq
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return value


    def _time_epoch(self, seconds: float, first_iteration: int) -> None:
        """`epoch_timing` of an epoch trained from `first_iteration` (not 0 when it was resumed) in `seconds`."""
        s = self.settings
        per_epoch = s.images_per_epoch or s.iters_per_epoch * s.images_per_iter
        images = per_epoch * (s.iters_per_epoch - first_iteration) / s.iters_per_epoch
        self.epoch_timing = {"seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}

    def _end_epoch(self, end_epoch: Callable[[float], None], mean_loss: float) -> None:
        """`end_epoch`; should it fail (an unreadable validation image), the epoch's training is saved first.

        The checkpoint is the one a stop in the epoch's last iteration writes
        (RNG state included, as it was before `end_epoch`), so a run started
        again evaluates the epoch and goes on exactly as if nothing had
        failed. Only for an error raised on every rank together
        (`distributed.raise_first_error`, also with one process); any other
        error leaves at once.
        """
        rng = ckpt.rng_state()
        try:
            end_epoch(mean_loss)
        except Exception as e:
            if not getattr(e, "raised_on_every_rank", False):  # a bug, or one rank's error: leave at once
                raise
            ckpt.set_rng_state(rng)
            try:
                self.save()
            except Exception as save_error:  # the first error is the one to report
                log(f"could not save the epoch's training before stopping: {save_error}", main_only=False)
                raise e from None
            log(f"epoch {self.state.epoch + 1}'s training is saved in {self.output_dir}, not its evaluation; run "
                "the same command again, once the error below is fixed, to evaluate it and go on")
            raise

    def _stop_and_save(self) -> None:
        """Save the stopped run (every rank), say so, and under SLURM let rank 0 requeue the job."""
        self.save()
        if self.stop.interrupted:  # Ctrl-C: the command exits 130 (TrainSpec.main); no SLURM requeue
            log(f"interrupted at epoch {self.state.epoch + 1}, step {self.state.step}; checkpoint saved in "
                f"{self.output_dir}; run the same command to resume")
            return
        log(f"stopped by {self.agreement.cause(self.stop.received)} at epoch {self.state.epoch + 1}, iteration "
            f"{self.state.iteration}, step {self.state.step}; checkpoint saved in {self.output_dir}. Run the same "
            "command again to resume.")
        if self.info.is_main and self.agreement.signal in STOP_SIGNALS:  # also when another rank received it
            note = slurm.requeue_if_running(os.environ)
            if note:
                log(note)

    def _optimizer_step(self) -> None:
        if self.settings.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.after_step is not None:
            self.after_step(self.model, self.state.step)

    def _log_progress(self, progress: ProgressMeter, step_loss: torch.Tensor, lr: float) -> None:
        """A progress line, a log.jsonl record and TensorBoard scalars (rank 0) of the step's loss.

        `step_loss` is this rank's mean over the optimizer step's micro-batches; the line shows its mean
        over processes.
        """
        state, s = self.state, self.settings
        mean_loss = float(distributed.all_reduce_mean(step_loss, self.agreement.reduce_device()))
        rates = progress.line(state.epoch, s.epochs, state.iteration, s.iters_per_epoch,
                              state.epoch * s.iters_per_epoch + state.iteration, {"loss": mean_loss, "lr": lr})
        # epochs count from 1 here as in every record of log.jsonl (RunState.epoch is 0-based)
        record = {"epoch": state.epoch + 1, "iteration": state.iteration, "step": state.step, "loss": mean_loss,
                  "lr": lr, "images_per_s": rates["images_per_s"], "time": time.time()}
        self.jsonl.write({"type": "train", **record})
        self.tb.scalars({"loss": mean_loss, "lr": lr, "images_per_s": rates["images_per_s"]}, state.step,
                        prefix="train/")
