"""The scaffolding of a training run, shared by pre-training and fine-tuning.

Each command builds its data, model and optimizer, then, in order:

    state = restore(saved, path, model, optimizer, scaler, seed, info)  # when resuming
    loader = train_loader(dataset, cfg, plan, info)
    loop = loop_config(cfg, plan, world_size)
    save = checkpoint_saver(out, cfg, info, model, optimizer, scaler, state)
    finished = train_epochs(wrap_ddp(model, info), loader, loss_fn, optimizer, scaler, state, loop, cfg,
                            device, save, end_epoch)

`train_epochs` runs fcmae.engine.train_one_epoch until the run is done or a
stop signal arrives, writing log.jsonl, TensorBoard and progress lines; the
command supplies `loss_fn` (a batch's loss) and `end_epoch` (its summary).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from fcmae import checkpoint as ckpt
from fcmae import distributed
from fcmae.data import ResumableDistributedSampler
from fcmae.engine import LoopConfig, NonFiniteLossError, RunState, train_one_epoch
from fcmae.logging_utils import JsonlLogger, ProgressMeter, TensorBoard, log
from fcmae.signals import StopRequest


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (callers add the rank so processes differ)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------- resuming
def find_resume(cfg: Dict[str, Any]) -> Optional[Path]:
    """The checkpoint to resume from: --resume PATH, the newest in output_dir (auto), or None."""
    if str(cfg["resume"]).lower() == "auto":
        return ckpt.find_latest_checkpoint(cfg["output_dir"])
    if cfg["resume"] in (None, "", "none", False):
        return None
    return Path(cfg["resume"])


def restore(saved: Dict[str, Any], path, model, optimizer, scaler, seed: int,
            info: distributed.DistInfo) -> RunState:
    """Load model, optimizer, scaler and this process's RNG state from a checkpoint; returns its RunState."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    state = RunState(**saved["run_state"])
    rngs = saved.get("rng") or []
    if len(rngs) == info.world_size:
        ckpt.set_rng_state(rngs[info.rank])
    else:
        log(f"note: the checkpoint has RNG states of {len(rngs)} processes, this run has {info.world_size}; "
            "reseeding")
        torch.manual_seed(seed + info.rank + 1_000_003 * state.step)
    log(f"resumed from {path}: epoch {state.epoch + 1}, iteration {state.iteration}, step {state.step}")
    return state


def gather_rng_states() -> list:
    """Every process's RNG state, gathered (on all ranks)."""
    state = ckpt.rng_state()
    if not distributed.is_dist():
        return [state]
    states = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def checkpoint_saver(out: Path, cfg: Dict[str, Any], info: distributed.DistInfo, model, optimizer, scaler,
                     state: RunState, extra: Optional[Callable[[], Dict[str, Any]]] = None) -> Callable[..., None]:
    """`save(epoch_done=None)`: the checkpoint of the run as it stands (called on every rank).

    `model` is the model without DDP; `extra()` adds the command's own entries.
    """

    def save(epoch_done: Optional[int] = None) -> None:
        rngs = gather_rng_states()
        if info.is_main:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None else None,
                       "epoch": state.epoch, "step": state.step, "run_state": state.as_dict(),
                       "rng": rngs, "config": cfg, "world_size": info.world_size}
            if extra is not None:
                payload.update(extra())
            ckpt.save_checkpoint(payload, out, epoch_done=epoch_done, save_every=cfg["save_every"],
                                 keep=cfg["keep_checkpoints"])
        distributed.barrier()

    return save


# ---------------------------------------------------------------- the run
def wrap_ddp(model: torch.nn.Module, info: distributed.DistInfo) -> torch.nn.Module:
    """DistributedDataParallel when there are several processes; the model itself otherwise."""
    if info.world_size <= 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def train_loader(dataset, cfg: Dict[str, Any], plan: Dict[str, Any], info: distributed.DistInfo,
                 collate_fn=None) -> DataLoader:
    """This process's shard of the training set, in an order that resumes mid-epoch (see train_epochs)."""
    sampler = ResumableDistributedSampler(dataset, cfg["batch_size"], num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=cfg["seed"])
    sampler.max_batches = plan["iters_per_epoch"]
    return DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                      pin_memory=info.device.type == "cuda", drop_last=True, collate_fn=collate_fn,
                      generator=torch.Generator())  # keeps the global RNG untouched by the loader


def loop_config(cfg: Dict[str, Any], plan: Dict[str, Any], world_size: int) -> LoopConfig:
    return LoopConfig(epochs=cfg["epochs"], iters_per_epoch=plan["iters_per_epoch"], update_freq=plan["update_freq"],
                      lr=plan["lr"], min_lr=float(cfg["min_lr"]), warmup_steps=plan["warmup_steps"],
                      total_steps=plan["total_steps"], images_per_iter=cfg["batch_size"] * world_size,
                      print_every=cfg["print_every"], clip_grad=cfg["clip_grad"],
                      exit_after_steps=cfg["exit_after_steps"])


def train_epochs(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler],
    state: RunState,
    loop: LoopConfig,
    cfg: Dict[str, Any],
    device: torch.device,
    save: Callable[..., None],
    end_epoch: Callable[[float, JsonlLogger, TensorBoard], None],
    after_step: Optional[Callable[[torch.nn.Module, int], None]] = None,
) -> bool:
    """Train from `state` to the last epoch; False when stopped by a signal (a checkpoint is saved).

    After each epoch: `end_epoch(mean train loss over processes, jsonl, tb)`
    writes the command's summary, then the state moves to the next epoch and
    the epoch checkpoint is saved. Writes log.jsonl (records after the
    resumed step are dropped first), TensorBoard and progress lines on rank 0.
    """
    main = distributed.is_main_process()
    out = Path(cfg["output_dir"])
    jsonl = JsonlLogger(out / "log.jsonl", enabled=main)
    jsonl.truncate_after("step", state.step)  # drop records written after the checkpoint
    tb = TensorBoard(cfg["log_dir"], enabled=main, purge_step=state.step or None)
    progress = ProgressMeter(loop.epochs * loop.iters_per_epoch, loop.images_per_iter,
                             start_step=state.epoch * loop.iters_per_epoch + state.iteration, enabled=main)
    stop = StopRequest().install()

    def on_log(record):
        jsonl.write({"type": "train", **record})
        tb.scalars({"loss": record["loss"], "lr": record["lr"], "images_per_s": record["images_per_s"]},
                   record["step"], prefix="train/")

    try:
        while state.epoch < loop.epochs:
            loader.sampler.set_epoch(state.epoch, start_batch=state.iteration)
            loader.dataset.set_epoch(state.epoch)
            finished = train_one_epoch(model, loader, loss_fn, optimizer, scaler, state, loop, device, cfg["amp"],
                                       stop, save, progress, on_log, after_step)
            if state.iteration >= loop.iters_per_epoch:
                local = state.epoch_loss_sum / max(state.epoch_loss_count, 1)
                end_epoch(distributed.all_reduce_mean(local, device if device.type == "cuda" else None), jsonl, tb)
                state.epoch += 1
                state.iteration = 0
                state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
                save(epoch_done=state.epoch)
            if not finished:
                log(f"stopped by {stop.signal_name or 'request'} at epoch {state.epoch + 1}, step {state.step}; "
                    f"checkpoint saved in {out}. Run the same command again to resume.")
                return False
    except NonFiniteLossError as e:
        last = ckpt.find_latest_checkpoint(out)
        raise NonFiniteLossError(
            f"{e}. The last good checkpoint ({last or 'none yet'}) is kept; lower the learning rate "
            "(--blr) or use --amp bf16/off, then run again to resume from it") from None
    finally:
        stop.restore()
        tb.close()
    return True
