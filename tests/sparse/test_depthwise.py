"""Every method of the `torch` backend's depthwise conv (sparse/depthwise.py) computes the same thing.

Each method is checked against the per-offset loop (the weight gradient the
backend first shipped with) and against autograd through the dense conv of
the zero-filled map, at every stage shape (p = 8, 4, 2, 1 sites per patch
side) with an odd channel count, fp32, tiny batches.
"""

import pytest
import torch
import torch.nn.functional as F

from sparse import depthwise
from sparse.depthwise import CONV_METHODS, WEIGHT_GRAD_METHODS, conv_at_patches, weight_grad_at_patches
from sparse.sites import PatchSites
from tests.helpers import assert_close, random_mask

GRID = (3, 4)  # patches per image side: small, and not square


def stage(p: int, channels: int = 5, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_patches = GRID[0] * GRID[1]
    sites = PatchSites(random_mask(batch, num_patches, 7, seed).reshape(batch, *GRID) == 0)
    x = torch.randn(batch, sites.num_kept, p, p, channels, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)
    weight = torch.randn(channels, 1, 7, 7, generator=gen)
    bias = torch.randn(channels, generator=gen)
    return sites, x, grad_out, weight, bias


def dense_reference(sites, x, grad_out, weight, bias):
    """Autograd through the dense conv of the zero-filled map: output, grad of x, weight and bias."""
    x, weight, bias = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    dense = sites._scatter_patches(x).permute(0, 3, 1, 2)
    out = F.conv2d(dense, weight, bias, padding=3, groups=weight.shape[0])
    out = sites._gather_patches(out.permute(0, 2, 3, 1), x.shape[2])
    (out * grad_out).sum().backward()
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("p", [8, 4, 2, 1])
@pytest.mark.parametrize("method", WEIGHT_GRAD_METHODS)
def test_weight_grad_method_equals_the_loop(p, method):
    sites, x, grad_out, weight, bias = stage(p)
    expected = weight_grad_at_patches(sites, x, grad_out, weight, "loop")
    assert expected.shape == weight.shape
    assert_close(weight_grad_at_patches(sites, x, grad_out, weight, method), expected)
    assert_close(expected, dense_reference(sites, x, grad_out, weight, bias)[2])  # the loop itself is right


@pytest.mark.parametrize("p", [8, 4, 2, 1])
@pytest.mark.parametrize("method", CONV_METHODS)
def test_conv_method_equals_dense_conv(p, method):
    sites, x, grad_out, weight, bias = stage(p)
    out, grad_x, _, _ = dense_reference(sites, x, grad_out, weight, bias)
    assert_close(conv_at_patches(sites, x, weight, bias, method), out)
    # The input gradient is the conv of the output gradient with the flipped kernel.
    assert_close(conv_at_patches(sites, grad_out, weight.flip(2, 3), None, method), grad_x)


@pytest.mark.parametrize("p", [8, 1])
@pytest.mark.parametrize("method", ["dense,loop", "windows,windows", "dense,dense", "dense,dense-grouped",
                                    "dense,windows-grouped", "windows,dense-grouped"])
def test_autograd_function_with_each_method(p, method):
    sites, x, grad_out, weight, bias = stage(p, seed=3)
    expected = dense_reference(sites, x, grad_out, weight, bias)
    x, weight, bias = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    index = depthwise.window_index(sites, p, x.device)
    out = depthwise.VisibleDepthwiseConv.apply(x, weight, bias, sites, depthwise.parse_method(method), index)
    (out * grad_out).sum().backward()
    for actual, reference in zip((out.detach(), x.grad, weight.grad, bias.grad), expected):
        assert_close(actual, reference)


def test_method_table_and_overrides():
    for p in (8, 4, 2, 1):
        method = depthwise.depthwise_method("cpu", p)
        assert method.conv in CONV_METHODS and method.weight_grad in WEIGHT_GRAD_METHODS
    # The CPU table as BENCHMARKS.md measured it (issue 13, second round).
    assert [tuple(depthwise.depthwise_method("cpu", p)) for p in (8, 4, 2, 1)] == [
        ("dense", "windows-grouped"), ("dense", "windows-grouped"), ("dense", "dense-grouped"),
        ("dense", "dense-grouped")]
    default = depthwise.depthwise_method("cuda", 4)
    try:
        depthwise.set_depthwise_method("windows,loop", "cuda")
        assert depthwise.depthwise_method("cuda", 4) == ("windows", "loop")
        depthwise.set_depthwise_method(("dense", "windows"), "cuda", p=4)
        assert depthwise.depthwise_method("cuda", 4) == ("dense", "windows")
        assert depthwise.depthwise_method("cuda", 2) == ("windows", "loop")
    finally:
        depthwise.set_depthwise_method(None, "cuda")
        depthwise.set_depthwise_method(None, "cuda", p=4)
    assert depthwise.depthwise_method("cuda", 4) == default
    with pytest.raises(ValueError, match="weight_grad method must be one of"):
        depthwise.set_depthwise_method("dense,fast", "cuda")
    with pytest.raises(ValueError, match="expected 'conv,weight_grad'"):
        depthwise.parse_method("dense")


@pytest.mark.parametrize("method", ["windows,windows", "dense,loop", "dense,dense-grouped", "dense,windows-grouped"])
def test_traces_without_graph_breaks(method):
    """torch.compile sees the Function as one graph: no tensor made inside it escapes (indices made outside)."""
    import torch._dynamo as dynamo

    sites, x, _, weight, bias = stage(4)
    parsed = depthwise.parse_method(method)

    def loss(x, weight, bias):
        index = depthwise.stage_indices(sites, 4, parsed, x.device)
        return depthwise.VisibleDepthwiseConv.apply(x, weight, bias, sites, parsed, index).square().sum()

    dynamo.reset()
    try:
        explained = dynamo.explain(loss)(x.requires_grad_(True), weight.requires_grad_(True), bias)
    finally:
        dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_depthwise_conv2d_equals_nn_conv2d(channels_last):
    """DepthwiseConv2d (the grouped weight gradient on a dense map) against nn.Conv2d: output and all gradients."""
    gen = torch.Generator().manual_seed(0)
    channels = 5
    ours = depthwise.DepthwiseConv2d(channels)
    plain = torch.nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, channels, 6, 9, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, channels, 6, 9, generator=gen)
    results = []
    for layer in (ours, plain):
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        out.backward(grad_out)
        results.append((out.detach(), inp.grad, layer.weight.grad, layer.bias.grad))
    for got, expected in zip(*results):
        assert_close(got, expected)
