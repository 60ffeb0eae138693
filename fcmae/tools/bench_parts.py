"""Benchmarks beyond the encoder: the full FCMAE step and the depthwise conv's methods.

Run through `python -m fcmae.tools.bench_encoder --mode step|dwconv` (fcmae.tools.bench_encoder has
the arguments). Both interleave the things they compare (one call of each in
turn, repeated) and report the minimum time, the least disturbed by other
processes on a shared machine; ratios are taken between interleaved runs.
The step is also split into its phases (encoder forward and backward,
decoder and loss forward and backward, optimizer), each timed on its own:
the decoder, the loss and the optimizer are the same code in every backend.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, Tuple, TypeVar

import torch

from fcmae.model import build_fcmae
from fcmae.pretrain.optim import build_optimizer
from sparse.depthwise import (
    CONV_METHODS,
    WEIGHT_GRAD_METHODS,
    conv_at_patches,
    depthwise_method,
    weight_grad_at_patches,
)
from sparse.masking import random_mask
from sparse.sites import PATCH_PIXELS, PatchSites
from sparse.sizes import resolve_arch

T = TypeVar("T")


def _load() -> str:
    """The 1-minute load average (shared machines: report it with every timing)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def timed_call(fn: Callable[[], T], device: torch.device, clock: str = "wall") -> Tuple[T, float]:
    """(`fn()`, the seconds it took): wall-clock, or this process's CPU time (`clock` 'cpu', CPU only).

    On CUDA the device is synchronised before and after, so that the call's
    queued kernels count and earlier ones do not. CPU time does not count the
    time other processes hold the cores, so it ranks CPU methods on a busy
    machine where wall-clock times are noise.
    """
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu times CPU work only; use --clock wall on other devices")
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = now()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, now() - start


def _interleaved_min(calls: Dict[str, Callable[[], object]], iters: int, warmup: int, device,
                     clock: str = "wall") -> Dict[str, float]:
    for fn in calls.values():
        for _ in range(warmup):
            timed_call(fn, device, clock)
    best = {name: float("inf") for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            best[name] = min(best[name], timed_call(fn, device, clock)[1])
    return best


def _mask(args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    num_patches = (args.img_size // PATCH_PIXELS) ** 2
    return random_mask(args.batch, num_patches, args.mask_ratio, generator=gen)


def bench_step(args: argparse.Namespace) -> Dict[str, float]:
    """Full pre-training step (forward, loss, backward, AdamW) of build_fcmae(size) per backend."""

    device = torch.device(args.device)
    backends = args.backends or ["torch", "dense-masked"]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    mask = _mask(args, gen).to(device)
    reference = build_fcmae(args.size, img_size=args.img_size, mask_ratio=args.mask_ratio)
    models, optimizers = {}, {}
    for name in backends:
        model = build_fcmae(args.size, img_size=args.img_size, mask_ratio=args.mask_ratio, backend=name)
        model.load_state_dict(reference.state_dict())
        models[name] = model.to(device).train()
        optimizers[name] = build_optimizer(model, lr=1.5e-4, weight_decay=0.05)  # the pre-training's AdamW

    phases = {name: {} for name in backends}  # backend -> phase -> minimum seconds

    def timed_phase(name: str, phase: str, fn: Callable[[], object]):
        def labelled():  # the phase's name in --profile's table
            with torch.autograd.profiler.record_function(phase):
                return fn()

        out, seconds = timed_call(labelled, device)  # wall-clock, whatever --clock says (the table says so)
        phases[name][phase] = min(phases[name].get(phase, float("inf")), seconds)
        return out

    def step(name: str) -> None:
        # The same step as training, cut where the encoder's output enters the decoder, so that the
        # encoder's and the decoder's backward are timed apart (the gradients are the same).
        model, optimizer = models[name], optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        features = timed_phase(name, "encoder forward", lambda: model.encoder(imgs, mask))
        cut = features.detach().requires_grad_(True)
        loss = timed_phase(name, "decoder+loss forward",
                           lambda: model.forward_loss(imgs, model.forward_decoder(cut, mask), mask))
        timed_phase(name, "decoder+loss backward", loss.backward)
        timed_phase(name, "encoder backward", lambda: features.backward(cut.grad))
        timed_phase(name, "optimizer", optimizer.step)

    load_before = _load()
    best = _interleaved_min({name: (lambda name=name: step(name)) for name in backends}, args.iters, args.warmup,
                            device, args.clock)
    print(f"FCMAE {args.size}, batch {args.batch}, {args.img_size}x{args.img_size}, mask ratio {args.mask_ratio}, "
          f"{args.device}, {args.threads} threads: minimum {args.clock} time of {args.iters} interleaved steps "
          f"(forward, loss, backward, AdamW); load average {load_before} before, {_load()} after")
    base = best.get("dense-masked", next(iter(best.values())))
    for name, seconds in best.items():
        print(f"{name:<14} {seconds * 1000:>9.1f} ms {seconds / base:>6.2f}x dense-masked")
    print("phases, minimum wall ms of each:")
    for name in backends:
        print(f"  {name:<12} " + ", ".join(f"{phase} {sec * 1000:.1f}" for phase, sec in phases[name].items()))
    if args.profile:
        _profile(lambda: step(backends[0]), backends[0], device)
    return best


def _profile(step: Callable[[], None], name: str, device: torch.device) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntorch.profiler, 2 steps of backend {name!r}, sorted by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=20))


def bench_dwconv(args: argparse.Namespace) -> Dict[tuple, Dict[str, float]]:
    """Time every method of each part of the depthwise conv at each stage of `size`."""
    device = torch.device(args.device)
    _, dims = resolve_arch(args.size)
    gen = torch.Generator().manual_seed(args.seed)
    grid = args.img_size // PATCH_PIXELS
    visible = (_mask(args, gen) == 0).reshape(args.batch, grid, grid).to(device)
    sites = PatchSites(visible)
    print(f"depthwise 7x7 conv of {args.size}, batch {args.batch}, {args.img_size}x{args.img_size}, mask ratio "
          f"{args.mask_ratio} ({sites.num_kept} kept patches), {args.device}, {args.threads} threads; minimum of "
          f"{args.iters} interleaved calls, {args.clock} ms. conv = forward (and input gradient, the same computation)")
    columns = [f"conv:{m}" for m in CONV_METHODS] + [f"wgrad:{m}" for m in WEIGHT_GRAD_METHODS]
    print(f"{'p':>2} {'C':>5} " + " ".join(f"{c:>14}" for c in columns) + "   fastest        default")
    results = {}
    for stage, channels in enumerate(dims):
        p = PATCH_PIXELS // 4 >> stage
        x = torch.randn(args.batch, sites.num_kept, p, p, channels, generator=gen).to(device)
        grad_out = torch.randn(x.shape, generator=gen).to(device)
        weight = torch.randn(channels, 1, 7, 7, generator=gen).to(device)
        calls = {f"conv:{m}": (lambda m=m: conv_at_patches(sites, x, weight, None, m)) for m in CONV_METHODS}
        calls.update({f"wgrad:{m}": (lambda m=m: weight_grad_at_patches(sites, x, grad_out, weight, m))
                      for m in WEIGHT_GRAD_METHODS})
        best = _interleaved_min(calls, args.iters, args.warmup, device, args.clock)
        fastest = (min(CONV_METHODS, key=lambda m: best[f"conv:{m}"]),
                   min(WEIGHT_GRAD_METHODS, key=lambda m: best[f"wgrad:{m}"]))
        default = depthwise_method(device.type, p)
        print(f"{p:>2} {channels:>5} " + " ".join(f"{best[c] * 1000:>14.2f}" for c in columns)
              + f"   {','.join(fastest):<14} {','.join(default)}")
        results[(p, channels)] = best
    print(f"load average {_load()}")
    return results
