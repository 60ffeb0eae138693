"""The 7x7 depthwise conv of the `torch` backend, evaluated at the kept patches.

Input and output are (N, K, p, p, C) kept patches (sparse.sites,
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
- "dense-grouped", "windows-grouped" (weight gradient only): the weight
  gradient written as one *forward* grouped conv (`_grouped_weight_grad`):
  each (map, channel) pair is a group whose input is the padded map (or
  halo window) and whose kernel is the output gradient on it; the 7x7
  outputs are summed over the maps. On CPU aten's depthwise forward kernel
  is several times faster than its depthwise weight-gradient kernel (about
  2 ms against 18 ms for tiny's first stage at batch 8), and this form
  runs the former, over the whole map or over the windows.

`DepthwiseConv2d` (end of this file) applies the grouped weight gradient to
an ordinary dense depthwise conv; the FCMAE decoder uses it. It is not a
per-stage choice: on CPU it always takes the grouped weight gradient, on
other devices it is a plain nn.Conv2d, and the method table and its
overrides below do not apply to it.

All give the same values up to float rounding (tests/sparse/test_depthwise.py).
`depthwise_method(device_type, p)` is the one place that picks them; the
CPU table comes from `python -m fcmae.tools.bench_encoder --mode dwconv` (BENCHMARKS.md).
Override with `set_depthwise_method(...)` or the environment variable
SPARSE_DEPTHWISE_METHOD="conv,weight_grad" (read at import, for every
device and stage), e.g. "windows,windows".

Nothing here reads tensor values on the host: no .item(), no nonzero(),
no branching on data, so the op is free of device syncs. The method is a
Python constant per (device, stage), and the indices it reads (the halo
windows', and `PatchSites.site_rows` for scatters and gathers) are made
before the autograd.Function (`stage_indices`), so torch.compile traces it
without graph breaks
(tests/sparse/test_depthwise.py). The CUDA rows were measured on one H100; the
default CUDA methods run in tests/runtime/test_cuda.py (where a GPU is present), the
others have run on CUDA only in `--mode dwconv`. The grouped methods and
`DepthwiseConv2d`'s backward have run on CPU only.
"""

from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNEL = 7
HALO = KERNEL // 2

CONV_METHODS = ("dense", "windows")
WEIGHT_GRAD_METHODS = ("dense", "windows", "loop", "dense-grouped", "windows-grouped")


class DepthwiseMethod(NamedTuple):
    """How each part of the depthwise conv is computed at one stage."""

    conv: str  # forward and input gradient
    weight_grad: str


# Fastest method per (device type, sites per patch side), measured with
# `python -m fcmae.tools.bench_encoder --mode dwconv` (BENCHMARKS.md, "The depthwise conv's
# methods"), fp32, 224x224, mask ratio 0.6. CPU: atto b16, tiny b8 and base b4
# on the 2-core Xeon VM, 2 threads: the grouped weight gradient on the windows
# at p = 8, 4 and on the dense map at p = 2, 1 (1.5-2.9x faster than aten's
# kernel or the loop); the conv over the dense map (windows are faster alone
# at p = 8, but the full step is not: within noise). CUDA: H100, atto b16,
# tiny b8, base b4: the windows weight gradient is fastest at every stage, the
# two conv methods tie (the grouped methods have not run on a GPU).
_DEFAULT_METHODS: Dict[Tuple[str, int], DepthwiseMethod] = {
    ("cpu", 8): DepthwiseMethod("dense", "windows-grouped"),
    ("cpu", 4): DepthwiseMethod("dense", "windows-grouped"),
    ("cpu", 2): DepthwiseMethod("dense", "dense-grouped"),
    ("cpu", 1): DepthwiseMethod("dense", "dense-grouped"),
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
def halo_windows(padded: torch.Tensor, index: torch.Tensor, p: int) -> torch.Tensor:
    """(N, H+6, W+6, C) zero-padded map -> (N*K, C, p+6, p+6) windows around each kept patch.

    `index` comes from `window_index`. The result is a channels-last view
    (memory (N*K, p+6, p+6, C)), the layout aten's CPU depthwise kernels are
    fastest on.
    """
    size = p + 2 * HALO
    rows = padded.reshape(-1, padded.shape[-1]).index_select(0, index)
    return rows.reshape(-1, size, size, padded.shape[-1]).permute(0, 3, 1, 2)


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
                    method: str, index: Optional[torch.Tensor] = None,
                    padded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 'same' conv of the zero-filled map of x, at the kept patches: (N, K, p, p, C).

    `padded`: x's zero-filled map with 3 sites of padding, when the caller has made it.
    """
    n, _, p, _, channels = x.shape
    padded = sites._scatter_patches(x, HALO) if padded is None else padded
    if method == "windows":
        index = window_index(sites, p, x.device) if index is None else index
        return _to_patches(F.conv2d(halo_windows(padded, index, p), weight, bias, groups=channels), n)
    out = F.conv2d(padded.permute(0, 3, 1, 2), weight, bias, groups=channels)
    return sites._gather_patches(out.permute(0, 2, 3, 1), p)


def weight_grad_at_patches(sites, x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                           method: str, index: Optional[torch.Tensor] = None,
                           grad_padded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of sum(conv_at_patches(x) * grad_out) w.r.t. the (C, 1, 7, 7) weight.

    `grad_padded`: grad_out's zero-filled map with 3 sites of padding, when the caller has made it.
    """
    n, k, p, _, channels = x.shape
    if method in ("dense", "dense-grouped"):
        if grad_padded is None:
            grad_dense = sites._scatter_patches(grad_out)
        else:
            grad_dense = grad_padded[:, HALO:grad_padded.shape[1] - HALO, HALO:grad_padded.shape[2] - HALO]
        if method == "dense-grouped":
            return _grouped_weight_grad(sites._scatter_patches(x, HALO, images_last=True), grad_dense, channels)
        return torch.ops.aten.convolution_backward(
            grad_dense.permute(0, 3, 1, 2), sites._scatter_patches(x, HALO).permute(0, 3, 1, 2), weight, None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], channels, [False, True, False])[1]
    padded = sites._scatter_patches(x, HALO)
    index = window_index(sites, p, x.device) if index is None else index
    if method == "windows-grouped":
        # The windows, gathered window-site-major: (p+6, p+6, N*K, C) memory.
        size = p + 2 * HALO
        windows = padded.reshape(-1, channels).index_select(0, _sites_major(index, size))
        return _grouped_weight_grad(windows.reshape(size, size, n * k, channels),
                                    grad_out.reshape(n * k, p, p, channels), channels)
    windows = halo_windows(padded, index, p)
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


def _sites_major(index: torch.Tensor, size: int) -> torch.Tensor:
    """A `window_index` reordered from (window, y, x) to (y, x, window)."""
    return index.view(-1, size, size).permute(1, 2, 0).reshape(-1)


def _grouped_weight_grad(inputs: torch.Tensor, grad_out: torch.Tensor, channels: int) -> torch.Tensor:
    """The depthwise weight gradient as one forward grouped conv.

    inputs (H+6, W+6, M, C): M zero-padded maps (images or windows);
    grad_out (M, H, W, C): the output gradient on each. For every map m and
    channel c, correlating input (m, c) with grad_out (m, c) as the kernel
    gives the 7x7 gradient of that map; summing over m gives the weight's.
    That is a conv with M*C groups, an (H+6)x(W+6) input and an HxW kernel
    per group, which aten runs with its fast forward depthwise kernel
    (channels-last input), unlike its depthwise weight-gradient kernel.
    """
    height, width, maps, _ = inputs.shape
    stacked = inputs.reshape(1, height, width, maps * channels).permute(0, 3, 1, 2)  # channels-last view
    kernels = grad_out.permute(0, 3, 1, 2).reshape(maps * channels, 1, *grad_out.shape[1:3])
    per_map = F.conv2d(stacked, kernels, groups=maps * channels)  # (1, M*C, 7, 7), channels-last memory
    grad_weight = per_map.permute(0, 2, 3, 1).reshape(KERNEL, KERNEL, maps, channels).sum(2)
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
        # The output gradient's zero-filled map, made once where both parts read it.
        grad_padded = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and method.weight_grad in ("dense", "dense-grouped"):
            grad_padded = sites._scatter_patches(grad_out, HALO)
        if ctx.needs_input_grad[0]:
            # The transpose of a 'same' stride-1 conv is the conv with the flipped kernel.
            grad_x = conv_at_patches(sites, grad_out, weight.flip(2, 3), None, method.conv, index, grad_padded)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad_at_patches(sites, x, grad_out, weight, method.weight_grad, index, grad_padded)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 1, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None


def visible_depthwise_conv(sites, x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The depthwise `conv` of the kept patches x (N, K, p, p, C), by this device's and stage's method."""
    p = x.shape[2]
    method = depthwise_method(x.device.type, p)
    index = stage_indices(sites, p, method, x.device)
    return VisibleDepthwiseConv.apply(x, conv.weight, conv.bias, sites, method, index)


def stage_indices(sites, p: int, method: DepthwiseMethod, device: torch.device) -> Optional[torch.Tensor]:
    """Make every index `VisibleDepthwiseConv` reads at this stage; return its window index (None if unused).

    The indices are cached on `sites`, and made here, before the
    autograd.Function, so that none is created inside it (see window_index).
    """
    sites.site_rows(p, HALO)  # x's (and the output gradient's) padded map
    if method.conv == "dense" or method.weight_grad in ("dense", "dense-grouped"):
        sites.site_rows(p)  # the gather of the dense conv's output; the unpadded output gradient's map
    if method.weight_grad == "dense-grouped":
        sites.site_rows(p, HALO, images_last=True)  # x's padded map laid out (H, W, N, C)
    uses_windows = method.conv == "windows" or method.weight_grad in ("windows", "windows-grouped", "loop")
    return window_index(sites, p, device) if uses_windows else None


# -- a dense depthwise conv with the grouped weight gradient -------------------
class _DenseDepthwiseConv(torch.autograd.Function):
    """Depthwise 7x7 'same' conv of an (N, C, H, W) map; the weight gradient by `_grouped_weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=HALO, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        channels = weight.shape[0]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # The transpose of a 'same' stride-1 conv is the conv with the flipped kernel.
            grad_x = F.conv2d(grad_out, weight.to(grad_out.dtype).flip(2, 3), padding=HALO, groups=channels)
        if ctx.needs_input_grad[1]:
            # (H+6, W+6, N, C): the zero-padded maps, image axis next to the channels.
            padded = F.pad(x.to(grad_out.dtype).permute(2, 3, 0, 1), (0, 0, 0, 0, HALO, HALO, HALO, HALO))
            grad_weight = _grouped_weight_grad(padded, grad_out.permute(0, 2, 3, 1), channels)
        if ctx.needs_input_grad[2]:  # False when bias is None
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d(dim, dim, 7, padding=3, groups=dim) whose weight gradient on CPU is one grouped conv.

    Same parameters and state-dict names as the nn.Conv2d it replaces. On CPU,
    aten's depthwise weight gradient is the slow part of the conv (BENCHMARKS.md,
    issue 13); elsewhere the layer is a plain nn.Conv2d. For dense models built
    from timm's blocks (the FCMAE decoder): swap it in for the block's `conv_dw`.
    """

    def __init__(self, dim: int):
        super().__init__(dim, dim, kernel_size=KERNEL, padding=HALO, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return _DenseDepthwiseConv.apply(x, self.weight, self.bias)
