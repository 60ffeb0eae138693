"""The `minkowski` backend: the encoder on MinkowskiEngine sparse tensors.

MinkowskiEngine (ME) is optional. This module imports it only when the
backend is asked for (`sparse.build_encoder(size, backend="minkowski")`, or
`from sparse.minkowski import MinkowskiSites`); without it that raises
`MinkowskiEngineUnavailable` (an ImportError) saying how to install it
(launch/install_minkowski.sh, docs/MINKOWSKI.md). The kernel-layout helpers at
the top of this module need only PyTorch.

How the forward pass runs (the encoder's modules are the shared ones of
sparse.encoder; this class only decides where the visible sites live):

- sites are the rows of an (M, C) feature matrix; their coordinates
  (batch, y, x) live in an ME `CoordinateManager`, y and x in stem-site units
  (stride 4 pixels), so stage s has tensor stride 2^s;
- stem: the 4x4 stride-4 conv runs densely on the image, as in the reference
  release, and its output is read at the visible sites;
- LayerNorm, the Linear layers and GELU act on the feature matrix directly;
- 7x7 depthwise conv: ME's kernel map of the stage (which input row feeds
  which output row for each of the 49 kernel offsets) drives a channel-wise
  convolution, the same computation as ME 0.5.4's public
  `MinkowskiChannelwiseConvolution` (PyPI's ME has no dedicated depthwise
  kernel; the reference release used a patched fork that has one), written
  as an autograd Function that saves only its input, not 49 gathered copies;
- 2x2 stride-2 downsample: ME's `MinkowskiConvolutionFunction`;
- GRN and drop path are per image, using the batch index of each row (the
  reference release's sparse GRN pools over the whole batch; this does not);
- the output is densified to (N, C, H/32, W/32) with zeros at masked sites.

Weights stay in the layout of sparse.encoder (nn.Conv2d / nn.Linear /
LayerNorm / GRN); they are converted to ME's kernel layout at forward time,
differentiably, so a checkpoint is the same state dict for every backend and
no conversion is ever needed when loading.
"""

import functools
from typing import Dict, List, Tuple

import torch

from sparse.sites import PATCH_PIXELS, Sites

STEM_STRIDE = 4  # the stem is a 4x4 stride-4 conv: stage-0 sites are 4x4 pixels

INSTALL_HINT = (
    "install it with `bash launch/install_minkowski.sh cpu` (or `cuda` for a CUDA build); "
    "see docs/MINKOWSKI.md. The 'torch' backend needs nothing extra and computes the same function"
)


class MinkowskiEngineUnavailable(ImportError):
    """Raised when the `minkowski` backend is asked for but MinkowskiEngine cannot be imported."""


# ---------------------------------------------------------------------------
# Kernel layouts (pure PyTorch; no MinkowskiEngine needed)
# ---------------------------------------------------------------------------
#
# ME enumerates the offsets of a 2D hypercube kernel with the FIRST spatial
# coordinate varying fastest: offset index k = i0 + K * i1, where i0 and i1
# are the kernel positions along coordinate axes 1 and 2. We store
# coordinates as (batch, y, x), so k = ky + K * kx, whereas torch flattens
# (ky, kx) row-major: r = ky * K + kx. The two orders differ by a transpose
# of the spatial axes. tests/sparse/test_minkowski.py checks this numerically
# against the torch backend (forward and gradients).


def me_kernel_permutation(kernel_size: int) -> torch.Tensor:
    """perm such that me_offsets = torch_offsets[perm] for a (y, x)-coordinate K x K kernel.

    `perm[k]` is the row-major torch offset index (ky * K + kx) of ME's
    offset k = ky + K * kx.
    """
    k = torch.arange(kernel_size * kernel_size)
    ky, kx = k % kernel_size, k // kernel_size
    return ky * kernel_size + kx


@functools.lru_cache(maxsize=None)
def _permutation_on(kernel_size: int, device: torch.device) -> torch.Tensor:
    """`me_kernel_permutation` on `device`, made once: the forward pass converts every block's weight."""
    return me_kernel_permutation(kernel_size).to(device)


def depthwise_to_me(weight: torch.Tensor) -> torch.Tensor:
    """torch depthwise weight (C, 1, K, K) -> ME channel-wise kernel (K*K, C). Differentiable."""
    c, _, kh, kw = weight.shape
    if kh != kw or weight.shape[1] != 1:
        raise ValueError(f"expected a square depthwise weight (C, 1, K, K), got {tuple(weight.shape)}")
    return weight.reshape(c, kh * kw)[:, _permutation_on(kh, weight.device)].t()


def depthwise_from_me(kernel: torch.Tensor) -> torch.Tensor:
    """ME channel-wise kernel (K*K, C) -> torch depthwise weight (C, 1, K, K)."""
    volume, c = kernel.shape
    k = int(round(volume ** 0.5))
    if k * k != volume:
        raise ValueError(f"expected a (K*K, C) channel-wise kernel, got {tuple(kernel.shape)}")
    inverse = torch.argsort(me_kernel_permutation(k)).to(kernel.device)
    return kernel[inverse].t().reshape(c, 1, k, k)


def conv_to_me(weight: torch.Tensor) -> torch.Tensor:
    """torch conv weight (C_out, C_in, K, K) -> ME kernel (K*K, C_in, C_out). Differentiable."""
    c_out, c_in, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"expected a square conv weight (C_out, C_in, K, K), got {tuple(weight.shape)}")
    flat = weight.reshape(c_out, c_in, kh * kw)[:, :, _permutation_on(kh, weight.device)]
    return flat.permute(2, 1, 0)


def conv_from_me(kernel: torch.Tensor) -> torch.Tensor:
    """ME kernel (K*K, C_in, C_out) -> torch conv weight (C_out, C_in, K, K)."""
    volume, c_in, c_out = kernel.shape
    k = int(round(volume ** 0.5))
    if k * k != volume:
        raise ValueError(f"expected a (K*K, C_in, C_out) kernel, got {tuple(kernel.shape)}")
    inverse = torch.argsort(me_kernel_permutation(k)).to(kernel.device)
    return kernel[inverse].permute(2, 1, 0).reshape(c_out, c_in, k, k)


# ---------------------------------------------------------------------------
# GRN's per-image norm over feature rows (pure PyTorch; no MinkowskiEngine needed)
# ---------------------------------------------------------------------------


def per_image_l2_rows(x: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-image, per-channel L2 norm of the rows of `x` (M, C), given back on every row of the image.

    Args:
        x: one feature row per site, any float dtype.
        batch_index: (M,) the image of each row.
        batch_size: the number of images.

    The sum of squares is accumulated in float32, whatever the dtype of x: in
    fp16, 1,254 sites of magnitude 8 already sum to more than fp16 holds (inf,
    then NaN downstream). The norm is returned in x's dtype (the dense
    backends' GRN, sparse.grn, keeps it in float32).
    """
    squares = x.float().square()
    sumsq = squares.new_zeros(batch_size, x.shape[1]).index_add_(0, batch_index, squares)
    # sqrt with a zero (not NaN) gradient where a channel is zero in a whole image,
    # as torch.linalg.vector_norm does.
    positive = sumsq > 0
    norm = torch.where(positive, sumsq, torch.ones_like(sumsq)).sqrt() * positive
    return norm.to(x.dtype).index_select(0, batch_index)


# ---------------------------------------------------------------------------
# Loading MinkowskiEngine lazily
# ---------------------------------------------------------------------------

_ME = None  # the imported MinkowskiEngine module, once loaded


def require_minkowski():
    """Import MinkowskiEngine (once) or raise MinkowskiEngineUnavailable with install instructions."""
    global _ME
    if _ME is None:
        try:
            import MinkowskiEngine as ME  # optional backend
            import MinkowskiEngineBackend._C  # noqa: F401  (the compiled extension)
        except (ImportError, OSError) as err:
            raise MinkowskiEngineUnavailable(
                f"backend 'minkowski' needs MinkowskiEngine, which could not be imported ({err}); "
                + INSTALL_HINT
            ) from err
        _ME = ME
    return _ME


def __getattr__(name: str):
    # `from sparse.minkowski import MinkowskiSites` is how the encoder selects
    # this backend: it imports MinkowskiEngine then, and fails clearly without it.
    if name == "MinkowskiSites":
        require_minkowski()
        return _MinkowskiSites
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# The channel-wise (depthwise) convolution over an ME kernel map
# ---------------------------------------------------------------------------

KernelMap = List[Tuple[int, torch.Tensor, torch.Tensor]]  # (offset index, input rows, output rows)


class _ChannelwiseConv(torch.autograd.Function):
    """out[o] = sum_k kernel[k] * x[i] over the (i, o) pairs of each offset k.

    The same sum as ME's public MinkowskiChannelwiseConvolution, with an
    explicit backward so that only x and the kernel are saved (autograd
    through ME's loop would keep one gathered (pairs, C) copy per offset).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, kernel_map: KernelMap, num_out: int):
        out = x.new_zeros(num_out, x.shape[1])
        for k, rows_in, rows_out in kernel_map:
            out.index_add_(0, rows_out, x.index_select(0, rows_in) * kernel[k])
        ctx.save_for_backward(x, kernel)
        ctx.kernel_map = kernel_map
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, kernel = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_kernel = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_kernel = torch.zeros_like(kernel) if need_kernel else None
        for k, rows_in, rows_out in ctx.kernel_map:
            g = grad_out.index_select(0, rows_out)
            if need_x:
                grad_x.index_add_(0, rows_in, g * kernel[k])
            if need_kernel:
                grad_kernel[k] = (x.index_select(0, rows_in) * g).sum(0)
        return grad_x, grad_kernel, None, None


# ---------------------------------------------------------------------------
# The Sites class of the backend
# ---------------------------------------------------------------------------


class _MinkowskiSites(Sites):
    """Visible sites as the (M, C) feature matrix of an ME sparse tensor.

    The object follows the forward pass: `downsample` moves it to the next
    stage's coordinate map, and the per-image ops use the current map's batch
    indices. Any mask is allowed (no equal-keep requirement).
    """

    needs_equal_keep = False

    def __init__(self, visible: torch.Tensor):
        super().__init__(visible)
        ME = require_minkowski()
        self.ME = ME
        self.device = visible.device
        if self.device.type == "cuda":
            if not ME.is_cuda_available():
                raise RuntimeError(
                    "this MinkowskiEngine was built CPU-only, but the encoder is on "
                    f"{self.device}; move it to the CPU or rebuild ME with "
                    "`bash launch/install_minkowski.sh cuda` (docs/MINKOWSKI.md)"
                )
            map_type = ME.CoordinateMapType.CUDA
        elif self.device.type == "cpu":
            map_type = ME.CoordinateMapType.CPU
        else:
            raise RuntimeError(f"the 'minkowski' backend runs on CPU or CUDA, not on {self.device}")
        self.manager = ME.CoordinateManager(
            D=2, coordinate_map_type=map_type, num_threads=max(1, torch.get_num_threads())
        )
        # Stage-0 sites: p x p per kept patch, in stem-site units.
        p = PATCH_PIXELS // STEM_STRIDE
        b, py, px = visible.nonzero(as_tuple=True)
        iy, ix = torch.meshgrid(
            torch.arange(p, device=self.device), torch.arange(p, device=self.device), indexing="ij"
        )
        ys = (py[:, None] * p + iy.reshape(1, -1)).reshape(-1)
        xs = (px[:, None] * p + ix.reshape(1, -1)).reshape(-1)
        bs = b[:, None].expand(-1, p * p).reshape(-1)
        coords = torch.stack([bs, ys, xs], 1).int()
        coords = coords.cpu() if map_type == ME.CoordinateMapType.CPU else coords.contiguous()
        self.key, (unique_map, _) = self.manager.insert_and_map(coords, [1, 1])
        # Row i of ME's map holds coordinate coords[unique_map[i]]; all are unique here.
        self._set_stage(coords[unique_map.long()], tensor_stride=1)

    # -- bookkeeping -----------------------------------------------------------
    def _set_stage(self, coords: torch.Tensor, tensor_stride: int):
        coords = coords.to(self.device).long()
        self.tensor_stride = tensor_stride
        self.batch_index = coords[:, 0]
        self.rows = coords[:, 1] // tensor_stride  # site row at this stage's resolution
        self.cols = coords[:, 2] // tensor_stride
        self.num_sites = coords.shape[0]
        self._depthwise_maps: Dict[int, KernelMap] = {}

    def _kernel_map(self, kernel_size: int) -> KernelMap:
        """ME's kernel map of a stride-1 K x K conv on the current map (cached per stage)."""
        if kernel_size not in self._depthwise_maps:
            ME = self.ME
            maps = self.manager.kernel_map(
                self.key, self.key, 1, kernel_size, 1, region_type=ME.RegionType.HYPER_CUBE
            )
            self._depthwise_maps[kernel_size] = [
                (int(k), in_out[0].long().to(self.device), in_out[1].long().to(self.device))
                for k, in_out in sorted(maps.items())
            ]
        return self._depthwise_maps[kernel_size]

    def as_sparse_tensor(self, x: torch.Tensor):
        """The current stage's features as an ME SparseTensor (no copy; for inspection or ME layers)."""
        self._check_rows(x, "as_sparse_tensor")
        return self.ME.SparseTensor(x, coordinate_map_key=self.key, coordinate_manager=self.manager)

    def _check_rows(self, x: torch.Tensor, op: str):
        if x.dim() != 2 or x.shape[0] != self.num_sites:
            raise ValueError(
                f"{op}: expected the ({self.num_sites}, C) feature matrix of the current stage, "
                f"got {tuple(x.shape)}"
            )

    # -- spatial ops -------------------------------------------------------------
    def stem(self, imgs, conv):
        # Dense stem (as in the reference release), read at the visible sites.
        if conv.stride != (STEM_STRIDE, STEM_STRIDE):
            raise ValueError(f"expected a stride-{STEM_STRIDE} stem conv, got {conv}")
        out = conv(imgs)  # (N, C, H/4, W/4)
        return out.permute(0, 2, 3, 1)[self.batch_index, self.rows, self.cols]

    def depthwise_conv(self, x, conv):
        self._check_rows(x, "depthwise_conv")
        k = conv.kernel_size[0]
        if conv.kernel_size != (k, k) or conv.stride != (1, 1) or conv.groups != conv.in_channels:
            raise ValueError(f"expected a square stride-1 depthwise conv, got {conv}")
        kernel = depthwise_to_me(conv.weight)
        out = _ChannelwiseConv.apply(x.contiguous(), kernel, self._kernel_map(k), self.num_sites)
        return out if conv.bias is None else out + conv.bias

    def downsample(self, x, conv):
        self._check_rows(x, "downsample")
        ME = self.ME
        k = conv.kernel_size[0]
        if conv.kernel_size != (k, k) or conv.stride != (k, k):
            raise ValueError(f"expected a K x K stride-K conv for downsampling, got {conv}")
        generator = ME.KernelGenerator(kernel_size=k, stride=k, dilation=1, dimension=2)
        out_key = self.manager.stride(self.key, [k, k])
        out = ME.MinkowskiConvolutionFunction.apply(
            x.contiguous(),
            conv_to_me(conv.weight).contiguous(),
            generator,
            _convolution_mode(ME),
            self.key,
            out_key,
            self.manager,
        )
        if conv.bias is not None:
            out = out + conv.bias
        self.key = out_key
        self._set_stage(self.manager.get_coordinates(out_key), self.tensor_stride * k)
        return out

    def to_dense(self, x):
        self._check_rows(x, "to_dense")
        scale = PATCH_PIXELS // STEM_STRIDE // self.tensor_stride
        if scale < 1:
            raise ValueError(f"tensor stride {self.tensor_stride} is coarser than a {PATCH_PIXELS}-pixel patch")
        h, w = self.grid_h * scale, self.grid_w * scale
        dense = x.new_zeros(self.batch_size, h, w, x.shape[1])
        dense = dense.index_put((self.batch_index, self.rows, self.cols), x)
        return dense.permute(0, 3, 1, 2).contiguous()

    # -- per-image ops -------------------------------------------------------------
    def zero_masked(self, x):
        return x  # only visible sites are stored

    def global_response_norm(self, x, weight, bias, eps):
        """GRN with per-image, per-channel L2 norms over the image's sites, one row per site (M, C)."""
        self._check_rows(x, "global_response_norm")
        norm = per_image_l2_rows(x, self.batch_index, self.batch_size)
        return x + torch.addcmul(bias, weight, x * (norm / (norm.mean(dim=-1, keepdim=True) + eps)))

    def drop_path(self, x, drop_prob, training):
        """Stochastic depth per image; draws the same random numbers as timm's drop_path."""
        if drop_prob == 0.0 or not training:
            return x
        keep_prob = 1.0 - drop_prob
        keep = x.new_empty(self.batch_size).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return x * keep.index_select(0, self.batch_index).unsqueeze(1)


def _convolution_mode(ME):
    """ME's default convolution mode enum (not re-exported at the top level of ME 0.5.4)."""
    mode = getattr(ME, "ConvolutionMode", None)
    if mode is None:
        from MinkowskiEngineBackend._C import ConvolutionMode as mode  # older MinkowskiEngine builds
    return mode.DEFAULT
