"""Random patch masks and (un)patchify.

A mask is an (N, L) tensor over the L = (H/p)*(W/p) patches of each image in
raster order: 1 = masked (hidden from the encoder), 0 = visible. Every image
keeps the same number of patches, int(L * (1 - mask_ratio)).
"""

from typing import Optional

import torch

PATCH_SIZE = 32


def num_kept(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio))


def check_mask_ratio(mask_ratio: float, num_patches: int) -> int:
    """Validate `mask_ratio` for images of `num_patches` patches; return the kept count."""
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    keep = num_kept(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches} "
            f"(int({num_patches} * (1 - {mask_ratio})) = 0); lower it or use larger images"
        )
    if keep >= num_patches:
        raise ValueError(f"mask_ratio {mask_ratio} masks no patch out of {num_patches}; raise it")
    return keep


def random_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: Optional[float] = None,
    device=None,
    generator: Optional[torch.Generator] = None,
    num_masked: Optional[int] = None,
) -> torch.Tensor:
    """(N, L) float mask, 1 = masked, with the same number of kept patches per image.

    The one mask sampler of the project (model, benchmarks, tests). Each image
    keeps the patches with the smallest of L uniform noise values, drawn from
    torch's RNG (or `generator`), so a seed reproduces the mask. Only shapes
    and Python numbers decide the kept count: no host sync, and it traces into
    one torch.compile graph.

    Args:
        batch_size: N, the number of images.
        num_patches: L, patches per image.
        mask_ratio: the masked fraction; keeps int(L * (1 - mask_ratio)) patches.
        device: where the mask is made (a `generator` must live there too).
        generator: optional RNG for reproducible masks.
        num_masked: instead of `mask_ratio`, exactly this many masked patches
            per image (0 <= num_masked < L).
    """
    if (mask_ratio is None) == (num_masked is None):
        raise ValueError("give exactly one of mask_ratio and num_masked")
    if mask_ratio is not None:
        keep = check_mask_ratio(mask_ratio, num_patches)
    elif not 0 <= int(num_masked) < num_patches:
        raise ValueError(f"num_masked must be in [0, {num_patches}), got {num_masked}")
    else:
        keep = num_patches - int(num_masked)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_keep = torch.argsort(noise, dim=1)[:, :keep]
    mask = torch.ones(batch_size, num_patches, device=device)
    mask.scatter_(1, ids_keep, 0.0)
    return mask


def patchify(imgs: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch flattened in (row, col, channel) order."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # n, gh, gw, row, col, c
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, grid_size, patch_size: int = PATCH_SIZE, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (N, L, p*p*C) -> (N, C, gh*p, gw*p); `grid_size` = (gh, gw)."""
    gh, gw = grid_size
    n, num, dim = patches.shape
    p = patch_size
    if num != gh * gw or dim != p * p * channels:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit a {gh}x{gw} grid of "
                         f"{p}x{p}x{channels} patches")
    x = patches.reshape(n, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, gh * p, gw * p)


def upsample_mask(mask: torch.Tensor, grid_size, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """(N, L) patch mask -> (N, 1, gh*p, gw*p) pixel mask."""
    gh, gw = grid_size
    m = mask.reshape(-1, 1, gh, gw)
    return m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
