"""Small shared pieces of the tests: tiny configs, random weights, random masks, image files."""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from fcmae import masking

# A custom config small enough for fast CPU tests, with a different width per stage.
TINY_DEPTHS = (1, 2, 1, 1)
TINY_DIMS = (8, 16, 24, 32)
# The tiny model of the command tests, as flags of both commands.
TINY_ARGS = ["--depths", "[1, 1, 1, 1]", "--dims", "[8, 16, 16, 16]"]
# One CPU process, no autocast, no loader workers.
CPU_ARGS = ["--device", "cpu", "--amp", "off", "--num_workers", "0"]


def write_images(folder: Path, count: int, size: int = 72, seed: int = 0) -> None:
    """`count` smooth, slightly noisy RGB PNGs of `size` x `size` (different per index and seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        base = np.stack([np.sin(xx / (3 + i % 5)), np.cos(yy / (2 + i % 7)), np.sin((xx + yy) / 9.0)], -1)
        img = ((base * 0.4 + 0.5 + rng.rand(size, size, 3) * 0.1).clip(0, 1) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter random values of a sensible scale (in place).

    Norm scales, GRN gamma/beta and all biases start as constants; tests
    randomise them so that a wrong mapping or a missing term shows.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() > 1:
                fan_in = param[0].numel()
                param.copy_(noise / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs error <= rel x the largest magnitude of `expected` (a scale-aware tolerance)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


def random_mask(batch: int, num_patches: int, num_masked: int, seed: int) -> torch.Tensor:
    """(N, L) float mask, 1 = masked, exactly num_masked masked patches per image (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return masking.random_mask(batch, num_patches, num_masked=num_masked, generator=gen)


def build_with_nan_loss(real_build, at_call: int):
    """A `build_fcmae` whose model's training loss turns NaN at its `at_call`-th training forward."""

    def build_with_nan(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward, calls = model.forward, {"n": 0}

        def nan_forward(imgs, mask=None):
            loss, pred, mask = forward(imgs, mask)
            if model.training:
                calls["n"] += 1
                if calls["n"] == at_call:
                    loss = loss * float("nan")
            return loss, pred, mask

        model.forward = nan_forward
        return model

    return build_with_nan
