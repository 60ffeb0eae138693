"""The pre-training step that `batch_fit: auto` measures to choose the per-GPU batch (fcmae.runtime.batch_fit).

`fit_pretrain_batch` runs before the plan is made, on CUDA only: it builds a
throwaway copy of the run's model and AdamW on the device, runs full steps
(forward, backward, optimizer step) on random images of the run's size,
channels and precision, and hands the measured peaks to the runtime's fit.
The random number generators are restored afterwards, so the run draws the
same masks and weights as without the fit. Eager steps are measured; a
compiled model usually holds less, so the fit errs on the safe side.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fcmae.pretrain.config import PretrainConfig
from fcmae.pretrain.optim import build_optimizer
from fcmae.runtime import distributed
from fcmae.runtime.batch_fit import CudaMemory, DeviceMemory, agree_across_ranks, batch_fit_wanted, fit_to_device
from fcmae.runtime.device import autocast_context
from fcmae.runtime.errors import PlanError
from fcmae.runtime.plan import BatchChoice


def synthetic_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: PretrainConfig,
                   device: torch.device) -> Callable[[int], None]:
    """One training step of `model` at a given batch, on random images; gradients are cleared after (also after
    running out of memory)."""

    def step(batch: int) -> None:
        try:
            images = torch.randn(batch, cfg.in_chans, cfg.input_size, cfg.input_size, device=device)
            with autocast_context(device, cfg.amp):
                loss, _, _ = model(images)
            loss.backward()
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)

    return step


def measure_batch(cfg: PretrainConfig, world_size: int, device: torch.device,
                  build_model: Callable[[PretrainConfig], torch.nn.Module], memory: DeviceMemory) -> BatchChoice:
    """This process's batch for `device`: a throwaway model and optimizer, measured steps, the runtime's fit.

    Args:
        cfg: the run's config (model, input size, channels, amp, optimizer, effective batch).
        world_size: the number of processes.
        device: where to measure.
        build_model: the run's model builder (fcmae.pretrain.main.build_model).
        memory: the device's memory (CudaMemory; tests give their own numbers).
    """
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # the run's own random draws stay as without the fit
        model = build_model(cfg).to(device).train()
        optimizer = build_optimizer(model, 0.0, cfg.weight_decay, cfg.betas, cfg.decay_grn_and_mask_token)
        step = synthetic_step(model, optimizer, cfg, device)
        step(1)  # AdamW's state exists before anything is measured, as in every step of the run
        ddp_buckets = sum(p.numel() * p.element_size() for p in model.parameters()) if world_size > 1 else 0
        choice = fit_to_device(cfg.effective_batch // world_size, cfg.batch_size, world_size, step, memory,
                               unmeasured_bytes=ddp_buckets)
        del model, optimizer, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return choice


def fit_pretrain_batch(cfg: PretrainConfig, info: distributed.DistInfo,
                       build_model: Callable[[PretrainConfig], torch.nn.Module]) -> Optional[BatchChoice]:
    """The per-GPU batch every rank uses (the smallest of their measurements), or None to keep the recipe's:
    batch_fit off (or an explicit --batch_size), not CUDA, an explicit update_freq, or an effective batch the
    processes cannot share evenly (the plan then says so)."""
    if (not batch_fit_wanted(cfg.batch_fit, info.device, cfg.update_freq)
            or cfg.effective_batch % info.world_size):
        return None
    choice, error = None, None
    try:
        choice = measure_batch(cfg, info.world_size, info.device, build_model, CudaMemory(info.device))
    except PlanError as e:
        error = e
    distributed.raise_first_error(error)  # no rank is left waiting in the agreement below
    return agree_across_ranks(choice, info.device)
