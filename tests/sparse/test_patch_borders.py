"""The 7x7 depthwise conv of the `torch` backend at patch borders, by value, against the dense-masked oracle.

A site within 3 sites of its patch's border reads sites of the neighbouring
patches: the halo that sparse.depthwise builds (padding, halo windows) and
sparse.sites indexes (site_rows). Here the kernel is zero but for its
outer rings, the offsets of at least min(p, 3) sites: every output is made
of terms 3 sites away, or (p <= 2) of terms of other patches only. Every
input is positive, so a missing or shifted halo row changes the value (the
test checks that these terms matter). The kept patches are
found, cut out and compared with plain slicing, independently of
PatchSites' own indexing. The masks keep patches next to kept and masked
patches; one keeps none on the map's edges, so that indices shifted by one
stay in range and fail here by value, not by a crash.
"""

import pytest
import torch
import torch.nn.functional as F

from sparse import depthwise
from sparse.sites import MaskedDenseSites, PatchSites
from tests.helpers import assert_close

HALO = 3  # sites a 7x7 kernel reaches beyond its centre
# (N, rows, columns) visibility, True = kept; the same number of kept patches per image.
MASKS = {
    "edges": torch.tensor([[[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 1]],
                           [[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool),
    "inner": torch.tensor([[[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]],
                           [[0, 0, 0, 0, 0], [0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]], dtype=torch.bool),
}
METHODS = ["dense,dense", "windows,windows", "dense,loop", "windows,dense-grouped", "dense,windows-grouped"]
CHANNELS = 3


def ring_conv(p: int) -> torch.nn.Conv2d:
    """A depthwise 7x7 conv whose kernel is zero but for its outer rings (offsets of at least min(p, 3) sites in
    some direction), positive there."""
    gen = torch.Generator().manual_seed(p)
    conv = torch.nn.Conv2d(CHANNELS, CHANNELS, 7, padding=HALO, groups=CHANNELS)
    offset = torch.arange(7) - HALO
    ring = torch.maximum(offset.abs()[:, None], offset.abs()[None, :]) >= min(p, HALO)
    with torch.no_grad():
        conv.weight.copy_((torch.rand(CHANNELS, 1, 7, 7, generator=gen) + 0.5) * ring)
        conv.bias.copy_(torch.randn(CHANNELS, generator=gen))
    return conv


def kept_patches(visible: torch.Tensor, image: int):
    """(row, column) of the kept patches of `image`, in raster order (the order of PatchSites' patches)."""
    return [(r, c) for r in range(visible.shape[1]) for c in range(visible.shape[2]) if visible[image, r, c]]


def cut(dense: torch.Tensor, visible: torch.Tensor, p: int) -> torch.Tensor:
    """(N, H, W, C) map -> (N, K, p, p, C) kept patches, by slicing."""
    return torch.stack([torch.stack([dense[n, r * p:(r + 1) * p, c * p:(c + 1) * p] for r, c in
                                     kept_patches(visible, n)]) for n in range(dense.shape[0])])


def border(p: int) -> torch.Tensor:
    """(p, p) True at the sites whose 7x7 window reaches beyond their patch."""
    index = torch.arange(p)
    near = (index < HALO) | (index >= p - HALO)
    return near[:, None] | near[None, :]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [8, 4, 2, 1])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_sites_next_to_patch_borders_equal_the_dense_masked_oracle(p, method, mask):
    visible = MASKS[mask]
    n, grid_h, grid_w = visible.shape
    gen = torch.Generator().manual_seed(p)
    dense = torch.rand(n, grid_h * p, grid_w * p, CHANNELS, generator=gen) + 0.5
    grad_dense = torch.randn(dense.shape, generator=gen)
    conv = ring_conv(p)

    oracle_in = dense.clone().requires_grad_(True)
    oracle = MaskedDenseSites(visible).depthwise_conv(oracle_in, conv)
    (oracle * grad_dense).sum().backward()
    expected = (cut(oracle.detach(), visible, p), cut(oracle_in.grad, visible, p), conv.weight.grad.clone())
    conv.zero_grad()

    x = cut(dense, visible, p).requires_grad_(True)
    sites = PatchSites(visible)
    depthwise.set_depthwise_method(method, "cpu", p=p)
    try:
        out = sites.depthwise_conv(x, conv)
        (out * cut(grad_dense, visible, p)).sum().backward()
    finally:
        depthwise.set_depthwise_method(None, "cpu", p=p)

    at_border = border(p)
    assert at_border.any()
    assert_close(out.detach()[:, :, at_border], expected[0][:, :, at_border])
    assert_close(x.grad[:, :, at_border], expected[1][:, :, at_border])
    assert_close(conv.weight.grad, expected[2])
    assert_close(out.detach(), expected[0])

    # The terms across the border matter: each patch convolved on its own (zeros around it) is far off.
    alone = F.conv2d(x.detach().reshape(-1, p, p, CHANNELS).permute(0, 3, 1, 2), conv.weight, conv.bias,
                     padding=HALO, groups=CHANNELS).permute(0, 2, 3, 1).reshape(x.shape)
    assert (alone - expected[0]).abs().max() > 0.5 * expected[0].abs().max()
