"""The 7x7 depthwise conv of the `torch` backend, evaluated at the kept patches.

Input and output are (N, K, p, p, C) kept patches (sparse/sites.py,
`PatchSites`). The conv reads 3 sites beyond each patch, so its inputs are
the zero-filled map of the visible sites (masked sites are zero). Each of its
three parts (forward, input gradient, weight gradient) can be computed in
more than one way, and which is fastest depends on the device and on the
stage (p = 8, 4, 2, 1 sites per patch side at 224 pixels). The forward and
the input gradient are the same computation (the input gradient of a 'same'
stride-1 conv is the conv of the output gradient with the flipped kernel), so
they share one choice, `conv`; the weight gradient has its own:

- "dense": aten's depthwise conv (or its weight gradient) over the whole
  zero-filled (N, Hp*p, Wp*p, C) map, then the kept patches taken out.
  Optimised kernels, but it also computes on masked sites.
- "windows": the same aten call, without padding, on the (N*K, p+6, p+6, C)
  halo windows around each kept patch. Only kept outputs, but the halos
  overlap (window area (p+6)^2 per p^2 sites).
- "loop" (weight gradient only): 49 multiply-and-sum passes over the
  windows, one per kernel offset. Many small ops; wins where the windows
  are mostly halo (p = 1, 2) and aten's depthwise weight gradient is slow.

All give the same values up to float rounding (tests/test_depthwise.py).
`depthwise_method(device_type, p)` is the one place that picks them; the
CPU table comes from `python -m sparse.bench --mode dwconv` (BENCHMARKS.md).
Override with `set_depthwise_method(...)` or the environment variable
SPARSE_DEPTHWISE_METHOD="conv,weight_grad" (read at import, for every
device and stage), e.g. "windows,windows".

Nothing here reads tensor values on the host: no .item(), no nonzero(),
no branching on data, so the op is free of device syncs. The method is a
Python constant per (device, stage), and the window index is made before
the autograd.Function, so torch.compile traces it without graph breaks
(tests/test_depthwise.py). The CUDA rows were measured on one H100; the
CUDA paths are covered there by `--mode dwconv` only, not by the tests.
"""

from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

KERNEL = 7
HALO = KERNEL // 2

CONV_METHODS = ("dense", "windows")
WEIGHT_GRAD_METHODS = ("dense", "windows", "loop")


class DepthwiseMethod(NamedTuple):
    """How each part of the depthwise conv is computed at one stage."""

    conv: str  # forward and input gradient
    weight_grad: str


# Fastest method per (device type, sites per patch side), measured with
# `python -m sparse.bench --mode dwconv` (BENCHMARKS.md, "The depthwise conv's
# methods"), fp32, 224x224, mask ratio 0.6. CPU: atto b16 and tiny b8, 2
# threads on a 16-core Xeon and 1 thread (CPU time) on the 2-core AMD EPYC VM,
# same ranking; at p=1 the loop wins for tiny and ties for atto. CUDA: H100,
# atto b16, tiny b8, base b4: the windows weight gradient is fastest at every
# stage, the two conv methods tie.
_DEFAULT_METHODS: Dict[Tuple[str, int], DepthwiseMethod] = {
    ("cpu", 8): DepthwiseMethod("dense", "windows"),
    ("cpu", 4): DepthwiseMethod("dense", "dense"),
    ("cpu", 2): DepthwiseMethod("dense", "dense"),
    ("cpu", 1): DepthwiseMethod("dense", "loop"),
    ("cuda", 8): DepthwiseMethod("dense", "windows"),
    ("cuda", 4): DepthwiseMethod("dense", "windows"),
    ("cuda", 2): DepthwiseMethod("dense", "windows"),
    ("cuda", 1): DepthwiseMethod("dense", "windows"),
}
# Any other device or stage: one aten call per part on the dense map.
_FALLBACK = DepthwiseMethod("dense", "dense")

# set_depthwise_method() overrides: (device type, p or None for every stage) -> method.
_overrides: Dict[Tuple[str, Optional[int]], DepthwiseMethod] = {}


def _check(method: DepthwiseMethod) -> DepthwiseMethod:
    for part, choices in zip(DepthwiseMethod._fields, (CONV_METHODS, WEIGHT_GRAD_METHODS)):
        if getattr(method, part) not in choices:
            raise ValueError(f"depthwise {part} method must be one of {choices}, got {getattr(method, part)!r}")
    return method


def parse_method(text: str) -> DepthwiseMethod:
    """'conv,weight_grad' (e.g. 'dense,windows') -> DepthwiseMethod."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"expected 'conv,weight_grad' (e.g. 'dense,windows'), got {text!r}")
    return _check(DepthwiseMethod(*parts))


def set_depthwise_method(method, device_type: str = "cuda", p: Optional[int] = None) -> None:
    """Override the method for `device_type` at stages of `p` sites per patch side (None: every stage).

    Args:
        method: a DepthwiseMethod, a 'conv,weight_grad' string, or None to drop the override.
        device_type: 'cpu', 'cuda', ...
        p: sites per patch side of the stage, or None for all stages.
    """
    key = (device_type, p)
    if method is None:
        _overrides.pop(key, None)
        return
    _overrides[key] = parse_method(method) if isinstance(method, str) else _check(DepthwiseMethod(*method))


def depthwise_method(device_type: str, p: int) -> DepthwiseMethod:
    """The method used on `device_type` at a stage with p x p sites per patch."""
    for key in ((device_type, p), (device_type, None)):
        if key in _overrides:
            return _overrides[key]
    return _DEFAULT_METHODS.get((device_type, p), _FALLBACK)


if os.environ.get("SPARSE_DEPTHWISE_METHOD"):
    for _device in ("cpu", "cuda"):
        set_depthwise_method(os.environ["SPARSE_DEPTHWISE_METHOD"], _device)


# -- the parts -----------------------------------------------------------------
def halo_windows(dense: torch.Tensor, index: torch.Tensor, p: int) -> torch.Tensor:
    """(N, H, W, C) zero-filled map -> (N*K, C, p+6, p+6) windows around each kept patch.

    `index` comes from `window_index`. The result is a channels-last view
    (memory (N*K, p+6, p+6, C)), the layout aten's CPU depthwise kernels are
    fastest on.
    """
    n, h, w, c = dense.shape
    padded = F.pad(dense, (0, 0, HALO, HALO, HALO, HALO)).reshape(n * (h + 2 * HALO) * (w + 2 * HALO), c)
    size = p + 2 * HALO
    return padded.index_select(0, index).reshape(-1, size, size, c).permute(0, 3, 1, 2)


def window_index(sites, p: int, device: torch.device) -> torch.Tensor:
    """Flat row indices of every halo window site in the padded map (cached on `sites` per stage).

    Made outside the autograd.Function, so that no tensor created inside it
    escapes (torch.compile traces the Function as one subgraph).
    """
    cache = getattr(sites, "_halo_window_index", None)
    if cache is None:
        cache = sites._halo_window_index = {}
    if p not in cache:
        size = p + 2 * HALO
        width = sites.grid_w * p + 2 * HALO
        height = sites.grid_h * p + 2 * HALO
        offsets = torch.arange(size, device=device)
        ys = (sites.rows * p).unsqueeze(-1) + offsets  # (N, K, size) padded-map row of each window row
        xs = (sites.cols * p).unsqueeze(-1) + offsets
        image = torch.arange(sites.batch_size, device=device).view(-1, 1, 1, 1)
        cache[p] = (image * height * width + ys.unsqueeze(-1) * width + xs.unsqueeze(-2)).reshape(-1)
    return cache[p]


def _to_patches(out: torch.Tensor, n: int) -> torch.Tensor:
    """(N*K, C, p, p) -> (N, K, p, p, C)."""
    nk, c, p, _ = out.shape
    return out.permute(0, 2, 3, 1).reshape(n, nk // n, p, p, c)


def _from_patches(x: torch.Tensor) -> torch.Tensor:
    """(N, K, p, p, C) -> (N*K, C, p, p) channels-last view."""
    n, k, p, _, c = x.shape
    return x.reshape(n * k, p, p, c).permute(0, 3, 1, 2)


def conv_at_patches(sites, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    method: str, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 'same' conv of the zero-filled map of x, at the kept patches: (N, K, p, p, C)."""
    n, _, p, _, channels = x.shape
    dense = sites._scatter_patches(x)
    if method == "windows":
        index = window_index(sites, p, x.device) if index is None else index
        return _to_patches(F.conv2d(halo_windows(dense, index, p), weight, bias, groups=channels), n)
    out = F.conv2d(dense.permute(0, 3, 1, 2), weight, bias, padding=HALO, groups=channels)
    return sites._gather_patches(out.permute(0, 2, 3, 1), p)


def weight_grad_at_patches(sites, x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                           method: str, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of sum(conv_at_patches(x) * grad_out) w.r.t. the (C, 1, 7, 7) weight."""
    n, k, p, _, channels = x.shape
    dense = sites._scatter_patches(x)
    if method == "dense":
        grad_dense = sites._scatter_patches(grad_out).permute(0, 3, 1, 2)
        return torch.ops.aten.convolution_backward(
            grad_dense, dense.permute(0, 3, 1, 2), weight, None, [1, 1], [HALO, HALO], [1, 1], False, [0, 0],
            channels, [False, True, False])[1]
    index = window_index(sites, p, x.device) if index is None else index
    windows = halo_windows(dense, index, p)
    if method == "windows":
        return torch.ops.aten.convolution_backward(
            _from_patches(grad_out), windows, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
            channels, [False, True, False])[1]
    windows = windows.permute(0, 2, 3, 1).reshape(n, k, p + 2 * HALO, p + 2 * HALO, channels)
    grad_weight = x.new_empty(KERNEL, KERNEL, channels)
    for ky in range(KERNEL):
        for kx in range(KERNEL):
            grad_weight[ky, kx] = (windows[:, :, ky:ky + p, kx:kx + p] * grad_out).sum((0, 1, 2, 3))
    return grad_weight.permute(2, 0, 1).unsqueeze(1)


class VisibleDepthwiseConv(torch.autograd.Function):
    """Depthwise conv (7x7, stride 1, 'same' padding) from kept patches to kept patches.

    Saves only the (N, K, p, p, C) input for backward; the zero-filled map and
    windows are rebuilt there (cheap next to the conv, and less memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sites, method: DepthwiseMethod, index: Optional[torch.Tensor]):
        ctx.save_for_backward(x, weight, index)
        ctx.sites, ctx.method = sites, method
        return conv_at_patches(sites, x, weight, bias, method.conv, index)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, index = ctx.saved_tensors
        sites, method = ctx.sites, ctx.method
        # Under autocast the forward conv ran in a lower precision than the
        # saved fp32 tensors: compute the gradients in the dtype of grad_out.
        grad_out = grad_out.contiguous()
        x, weight = x.to(grad_out.dtype), weight.to(grad_out.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # The transpose of a 'same' stride-1 conv is the conv with the flipped kernel.
            grad_x = conv_at_patches(sites, grad_out, weight.flip(2, 3), None, method.conv, index)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad_at_patches(sites, x, grad_out, weight, method.weight_grad, index)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 1, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None


def visible_depthwise_conv(sites, x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The depthwise `conv` of the kept patches x (N, K, p, p, C), by this device's and stage's method."""
    p = x.shape[2]
    method = depthwise_method(x.device.type, p)
    uses_windows = method.conv == "windows" or method.weight_grad != "dense"
    index = window_index(sites, p, x.device) if uses_windows else None
    return VisibleDepthwiseConv.apply(x, conv.weight, conv.bias, sites, method, index)
