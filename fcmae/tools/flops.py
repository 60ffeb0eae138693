"""Analytic FLOP counts of the encoder and the FCMAE step, for model FLOPs utilisation.

Only convolutions and matmuls are counted (2 FLOPs per multiply-add), as
torch.utils.flop_counter.FlopCounterMode does; norms, GELU, GRN and the loss
are a few percent at most. "Visible" means the useful work: the sites of the
kept patches only (a backend that computes more, e.g. dense-masked, gets no
credit for it). A training step (forward + backward) is taken as 3x the
forward: the backward computes two matmuls (input and weight gradients) per
forward one.
"""

from typing import Sequence

PATCH = 32  # pixels per patch side; the encoder's total stride
STEM_STRIDE = 4


def encoder_forward_flops(depths: Sequence[int], dims: Sequence[int], kept_patches: int, in_chans: int = 3) -> int:
    """Forward FLOPs of the ConvNeXt V2 encoder over `kept_patches` 32x32 patches (all images together).

    Per patch, stage i has (8 / 2**i)**2 sites: the stem is a 4x4 stride-4
    conv, each downsample a 2x2 stride-2 conv, each block a 7x7 depthwise
    conv (on the visible sites) and a C -> 4C -> C MLP.
    """
    total = 0
    side = PATCH // STEM_STRIDE  # sites per patch side at stage 0
    total += 2 * (STEM_STRIDE * STEM_STRIDE * in_chans) * dims[0] * side * side
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        if i:
            side //= 2
            total += 2 * (4 * dims[i - 1]) * dim * side * side
        per_site = 2 * 49 * dim + 2 * (dim * 4 * dim) * 2  # depthwise 7x7 + fc1 + fc2
        total += depth * per_site * side * side
    return total * kept_patches


def decoder_forward_flops(encoder_dim: int, decoder_dim: int, decoder_depth: int, sites: int,
                          in_chans: int = 3) -> int:
    """Forward FLOPs of FCMAE's dense decoder over `sites` stride-32 sites (all images together)."""
    per_site = 2 * encoder_dim * decoder_dim  # proj, 1x1 conv
    per_site += decoder_depth * (2 * 49 * decoder_dim + 2 * (decoder_dim * 4 * decoder_dim) * 2)
    per_site += 2 * decoder_dim * PATCH * PATCH * in_chans  # pred, 1x1 conv
    return per_site * sites


def step_flops(depths: Sequence[int], dims: Sequence[int], batch: int, num_patches: int, kept: int,
               decoder_dim: int = 0, decoder_depth: int = 0, in_chans: int = 3) -> int:
    """FLOPs of one training step (forward + backward = 3x forward) of the encoder, plus the decoder if given.

    Args:
        depths, dims: the encoder's architecture.
        batch: images per step.
        num_patches: patches per image (the decoder runs on all of them).
        kept: visible patches per image (the encoder's useful work).
        decoder_dim, decoder_depth: FCMAE's decoder; 0 for the encoder alone.
        in_chans: image channels (the stem's input and the decoder's prediction).
    """
    forward = encoder_forward_flops(depths, dims, batch * kept, in_chans)
    if decoder_depth:
        forward += decoder_forward_flops(dims[-1], decoder_dim, decoder_depth, batch * num_patches, in_chans)
    return 3 * forward
