"""Small shared pieces of the tests: tiny configs, random weights, random masks."""

import math

import torch
import torch.nn as nn

from fcmae import masking

# A custom config small enough for fast CPU tests, with a different width per stage.
TINY_DEPTHS = (1, 2, 1, 1)
TINY_DIMS = (8, 16, 24, 32)


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
