"""The GRN with a hand-written backward (sparse/grn.py) equals timm's GlobalResponseNorm.

timm's layer is written with autograd's ops on a dense channels-last map;
ours must give the same output and the same gradients of x, weight and
bias, including where a channel of an image is all zero (its norm is 0)
and on the (N, K, p, p, C) patch layout of the `torch` backend.
"""

import pytest
import torch
from timm.layers.grn import GlobalResponseNorm

from sparse.grn import global_response_norm
from tests.helpers import assert_close

CHANNELS = 7  # odd


def inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[:, :, 1] = 0  # masked sites are zero
    x[0, ..., 3] = 0  # one channel of one image is all zero: its norm is 0
    weight = torch.randn(shape[-1], generator=gen)
    bias = torch.randn(shape[-1], generator=gen)
    grad_out = torch.randn(shape, generator=gen)
    return x, weight, bias, grad_out


def timm_grn(x, weight, bias, grad_out):
    layer = GlobalResponseNorm(x.shape[-1])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


def ours(x, weight, bias, grad_out):
    x, weight, bias = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    out = global_response_norm(x, weight, bias, 1e-6)
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, bias.grad


def test_equals_timm_on_a_dense_map():
    args = inputs((3, 5, 6, CHANNELS))
    for got, expected in zip(ours(*args), timm_grn(*args)):
        assert torch.isfinite(got).all()
        assert_close(got, expected)


def test_patch_layout_equals_the_dense_map_of_the_same_sites():
    # (N, K, p, p, C) patches hold the same sites as an (N, K*p, p, C) map: same statistics per image.
    x, weight, bias, grad_out = inputs((2, 3, 4, 4, CHANNELS))
    as_map = [t.reshape(2, 12, 4, CHANNELS) if t.dim() == 5 else t for t in (x, weight, bias, grad_out)]
    for got, expected in zip(ours(x, weight, bias, grad_out), timm_grn(*as_map)):
        assert_close(got.reshape(expected.shape), expected)


def test_only_the_gradients_asked_for():
    x, weight, bias, grad_out = inputs((2, 4, 4, CHANNELS))
    x.requires_grad_(True)
    global_response_norm(x, weight, bias).backward(grad_out)  # weight and bias frozen
    assert_close(x.grad, timm_grn(x.detach(), weight, bias, grad_out)[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_gives_its_dtype_back_for_x(dtype):
    x, weight, bias, grad_out = inputs((2, 4, 4, CHANNELS))
    x = x.to(dtype).requires_grad_(True)
    weight.requires_grad_(True)
    out = global_response_norm(x, weight, bias)
    out.backward(grad_out)
    assert out.dtype == torch.float32  # the norm and the scale are float32, as with autocast's norm
    assert x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    expected = timm_grn(x.detach().float(), weight.detach(), bias, grad_out)
    assert torch.allclose(out, expected[0], rtol=2e-2, atol=2e-2)
    assert torch.allclose(x.grad.float(), expected[1], rtol=5e-2, atol=5e-2)
