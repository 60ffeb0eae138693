"""Timed rows of the GPU check: the encoder and the full pre-training step, per backend and compile mode.

One row = one (size, batch, backend, mode, what) case:

- what="encoder": the encoder's forward + backward of a scalar of its output
  (the training cost of the encoder alone; the masked backends get a 60% mask).
- what="step": the whole pre-training step: FCMAE forward with the mask
  drawn inside, backward, AdamW step (`fcmae.pretrain.optim.build_optimizer`: fused,
  as in training).

Backends: "torch", "dense-masked" (and "minkowski" when installed) are the
sparse encoder's; "timm" is timm's dense ConvNeXt V2 (`forward_features`).
Its step row puts the same FCMAE decoder, mask token and masked-patch loss
on top of the dense encoder fed the masked image (masked patches' pixels set
to zero): the same task and head, so the rows differ only in how the encoder
computes. It counts the FLOPs of every site, since it computes them all; the
sparse backends are credited only with the visible sites' FLOPs.

Modes (MODES): eager; compiled (the whole model, one graph); regional (each
ConvNeXt block compiled on its own, one graph per stage); cudagraphs (the
whole model in CUDA graphs, inductor's reduce-overhead; CUDA only). The
compiled modes are `fcmae.runtime.device.compile_model`'s whole, regional and
cudagraphs, as the training commands compile.

Timing: `warmup` untimed steps (they include compilation; `compile_s` is
their time, from the first call to the first timed step, null for eager),
then the median of `iters` steps, each timed with CUDA events (CPU: wall
clock). An out-of-memory error is recorded in the row (`oom`: true). Peak memory
is torch.cuda.max_memory_allocated over the timed steps (CPU: None). MFU is
the analytic FLOPs (fcmae.tools.flops) / time / the device's peak dense bf16 rate.
The caller sets the device's training defaults first
(`fcmae.runtime.device.configure_device`: TF32, cudnn.benchmark on CUDA).
"""

from __future__ import annotations

import statistics
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXt

from fcmae.model import FCMAE, build_fcmae
from fcmae.pretrain.optim import build_optimizer
from fcmae.runtime.device import compile_model
from fcmae.tools.flops import step_flops
from sparse import build_encoder
from sparse.masking import PATCH_SIZE, num_kept, random_mask, upsample_mask

MASK_RATIO = 0.6
MODES = ("eager", "compiled", "regional", "cudagraphs")
COMPILE_MODE = {"compiled": "whole", "regional": "regional", "cudagraphs": "cudagraphs"}  # -> compile_model's
DECODER_DIM, DECODER_DEPTH = 512, 1

# Dense bf16 tensor-core peak (no sparsity), from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # H200 and GH200
    ("A100", 312e12),
    ("L40S", 362e12),
)


@dataclass(frozen=True)
class Arch:
    """A benchmarked configuration: a registered size, or the tiny custom one of --quick."""

    name: str
    size: str  # registry name given to the builders (depths/dims override it)
    depths: Sequence[int]
    dims: Sequence[int]
    img_size: int
    batch: int
    decoder_dim: int = DECODER_DIM


def peak_bf16_flops(device: torch.device) -> Optional[float]:
    """The device's peak dense bf16 FLOP/s, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


class MaskedImageDenseEncoder(nn.Module):
    """timm's dense ConvNeXt V2 as an FCMAE encoder: it sees the image with masked patches zeroed."""

    def __init__(self, arch: Arch):
        super().__init__()

        self.model = ConvNeXt(depths=arch.depths, dims=arch.dims, ls_init_value=None, use_grn=True, num_classes=0)
        self.num_features = self.model.num_features

    def forward(self, imgs: torch.Tensor, mask: Optional[torch.Tensor] = None, num_kept: Optional[int] = None):
        if mask is not None:
            grid = (imgs.shape[2] // PATCH_SIZE, imgs.shape[3] // PATCH_SIZE)
            imgs = imgs * (1 - upsample_mask(mask, grid).to(imgs.dtype))
        return self.model.forward_features(imgs)


def build_case(arch: Arch, backend: str, what: str, device: torch.device):
    """(model, run) where run(model_or_compiled, imgs) does one timed step; the model is on `device`."""

    num_patches = (arch.img_size // PATCH_SIZE) ** 2
    if what == "encoder":
        if backend == "timm":
            model = MaskedImageDenseEncoder(arch).to(device)  # no mask: forward_features of the whole image

            def run(m, imgs):
                m(imgs).float().mean().backward()
        else:
            model = build_encoder(arch.size, backend, arch.depths, arch.dims).to(device)
            keep = num_kept(num_patches, MASK_RATIO)
            mask = random_mask(arch.batch, num_patches, MASK_RATIO, device=device)

            def run(m, imgs):
                m(imgs, mask, num_kept=keep).float().mean().backward()

        def step(m, imgs):
            run(m, imgs)
            for p in model.parameters():
                p.grad = None
        return model, step

    if backend == "timm":
        model = FCMAE(MaskedImageDenseEncoder(arch), img_size=arch.img_size, mask_ratio=MASK_RATIO,
                      decoder_dim=arch.decoder_dim, decoder_depth=DECODER_DEPTH)
    else:
        model = build_fcmae(arch.size, img_size=arch.img_size, mask_ratio=MASK_RATIO, decoder_dim=arch.decoder_dim,
                            decoder_depth=DECODER_DEPTH, backend=backend, depths=arch.depths, dims=arch.dims)
    model = model.to(device).train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)

    def step(m, imgs):
        loss = m(imgs)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def row_flops(arch: Arch, backend: str, what: str) -> int:
    num_patches = (arch.img_size // PATCH_SIZE) ** 2
    kept = num_patches if backend == "timm" else num_kept(num_patches, MASK_RATIO)
    decoder_depth = DECODER_DEPTH if what == "step" else 0
    return step_flops(arch.depths, arch.dims, arch.batch, num_patches, kept, arch.decoder_dim, decoder_depth)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int,
               iters: int) -> Tuple[float, List[float]]:
    """(seconds of the `warmup` untimed steps, milliseconds of each of the `iters` steps after them)."""
    begin = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - begin
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return warmup_s, [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1000)
    return warmup_s, times


def bench_row(arch: Arch, backend: str, what: str, mode: str, device: torch.device, warmup: int, iters: int,
              compile_backend: str = "inductor") -> Dict:
    """One row of the bench table; an error (compile failure, OOM) is recorded in the row, not raised.

    Args:
        mode: one of MODES.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    compiled = mode != "eager"
    row = {"size": arch.name, "batch": arch.batch, "backend": backend, "mode": mode, "what": what,
           "ms": None, "img_s": None, "peak_mib": None, "mfu": None, "compile_s": None}
    model = None
    try:
        torch.manual_seed(0)
        model, step = build_case(arch, backend, what, device)
        runner = model
        if compiled:
            torch._dynamo.reset()
            runner = compile_model(model, compile_backend, COMPILE_MODE[mode])  # as the training commands compile
        imgs = torch.randn(arch.batch, 3, arch.img_size, arch.img_size, device=device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

        def one_step():
            with amp:
                step(runner, imgs)

        begin = time.perf_counter()
        warmup_s, times = time_steps(one_step, device, warmup, iters)
        ms = statistics.median(times)
        print(f"  ({arch.name} {what} {backend} {mode}: {time.perf_counter() - begin:.0f} s with warm-up and "
              "compilation)", flush=True)
        row.update(ms=round(ms, 3), img_s=round(arch.batch / ms * 1000, 1),
                   compile_s=round(warmup_s, 2) if compiled else None)
        if device.type == "cuda":
            row["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        peak = peak_bf16_flops(device)
        if peak:
            row["mfu"] = round(row_flops(arch, backend, what) / (ms / 1000) / peak, 4)
    except Exception as e:  # noqa: BLE001 - a failing row must not stop the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if isinstance(e, torch.OutOfMemoryError):
            row["oom"] = True
        traceback.print_exc(limit=3)
    finally:
        del model
        if compiled:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row
