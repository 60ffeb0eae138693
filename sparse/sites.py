"""Where the encoder's features live: one class per backend.

The encoder's layers are written once (sparse.encoder). Everything that
depends on how the visible sites are stored goes through a `Sites` object,
made from the mask at the start of each forward pass:

- `PatchSites` (backend "torch"): the visible sites of a batch as a regular
  tensor (N, K, p, p, C): N images, K kept patches per image, p x p sites per
  patch at the current stage, C channels. Pointwise layers run on it
  directly, so they only compute visible work; the 2x2 downsample never
  crosses a patch and is a reshape plus a matmul; only the 7x7 depthwise conv
  looks across patch borders (sparse.depthwise).
- `MaskedDenseSites` (backend "dense-masked"): full dense maps (N, H, W, C)
  with masked sites set to zero before and after every spatial op. Full dense
  cost, numerically the same as sparse convolution: the oracle.

Both keep features channels-last, so LayerNorm and Linear layers act on the
last axis in either case.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import drop_path as timm_drop_path

from sparse.depthwise import depthwise_method, stage_indices, visible_depthwise_conv
from sparse.grn import global_response_norm

PATCH_PIXELS = 32  # FCMAE masks 32x32-pixel patches: one site at stride 32.


class Sites:
    """The operations whose meaning depends on where visible sites are stored."""

    #: True when the backend needs the same number of kept patches per image.
    needs_equal_keep = False

    def __init__(self, visible: torch.Tensor):
        # visible: (N, Hp, Wp) bool, True where the 32x32 patch is kept.
        self.visible = visible
        self.batch_size, self.grid_h, self.grid_w = visible.shape

    def prepare(self, x: torch.Tensor) -> None:
        """Make (and cache) what the blocks of x's stage read, before the first of them.

        A block then only reads this object. That lets a block compiled on its
        own serve every block of its stage with one graph (regional
        compilation, fcmae.runtime.device): a first block that filled a
        cache would compile differently from the rest.
        """

    # -- spatial ops ---------------------------------------------------------
    def stem(self, imgs: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        raise NotImplementedError

    def depthwise_conv(self, x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        raise NotImplementedError

    def downsample(self, x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) map of the features, exact zeros at masked sites."""
        raise NotImplementedError

    # -- per-image ops -------------------------------------------------------
    def zero_masked(self, x: torch.Tensor) -> torch.Tensor:
        """Set features at masked sites to zero (a no-op where none are stored)."""
        return x

    def global_response_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
        """GRN with statistics over the sites of each image (sparse.grn).

        Correct for any layout whose axes are (image, site axes..., channel)
        and whose masked sites, if stored, are zero.
        """
        return global_response_norm(x, weight, bias, eps)

    def drop_path(self, x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
        """Stochastic depth that drops whole images (the batch axis is first)."""
        return timm_drop_path(x, drop_prob, training)


class PatchSites(Sites):
    """Visible sites as a regular (N, K, p, p, C) tensor of kept patches."""

    needs_equal_keep = True

    def __init__(self, visible: torch.Tensor, num_kept: Optional[int] = None):
        """`num_kept`: kept patches per image when known (no host sync); None reads it from `visible`."""
        super().__init__(visible)
        n = self.batch_size
        flat = visible.reshape(n, -1)
        if num_kept is None:
            num_kept = int(flat[0].sum()) if n else 0
        self.num_kept = num_kept
        # A stable sort puts each image's kept patches first, in raster order:
        # the indices have a static shape, so no nonzero() (a sync) is needed.
        order = torch.argsort((~flat).to(torch.uint8), dim=1, stable=True)
        kept = order[:, :num_kept]
        self.rows = kept // self.grid_w  # (N, K) patch row of each kept patch
        self.cols = kept % self.grid_w  # (N, K) patch column
        self.batch_index = torch.arange(n, device=visible.device).unsqueeze(1)  # (N, 1)
        self._site_rows = {}  # (p, pad, images_last) -> flat index of the kept sites in a map

    def site_rows(self, p: int, pad: int = 0, images_last: bool = False) -> torch.Tensor:
        """Row of each kept site, in (N, K, p, p) order, in the map viewed as (sites, C) rows (cached).

        The map has p x p sites per patch and `pad` extra sites on every side,
        laid out (N, H, W) or, with `images_last`, (H, W, N). Gathers and
        scatters through this index are one index_select or index_copy over
        whole rows of C channels.
        """
        key = (p, pad, images_last)
        if key not in self._site_rows:
            height, width = self.grid_h * p + 2 * pad, self.grid_w * p + 2 * pad
            offsets = torch.arange(p, device=self.rows.device)
            ys = (pad + self.rows * p).unsqueeze(-1) + offsets  # (N, K, p) map row of each patch row
            xs = (pad + self.cols * p).unsqueeze(-1) + offsets  # (N, K, p) map column
            site = ys.unsqueeze(-1) * width + xs.unsqueeze(-2)  # (N, K, p, p) site within one image's map
            image = self.batch_index.view(-1, 1, 1, 1)
            rows = site * self.batch_size + image if images_last else image * (height * width) + site
            self._site_rows[key] = rows.reshape(-1)
        return self._site_rows[key]

    def _gather_patches(self, dense: torch.Tensor, p: int) -> torch.Tensor:
        """(N, Hp*p, Wp*p, C) channels-last map -> (N, K, p, p, C) kept patches."""
        n, _, _, c = dense.shape
        return dense.reshape(-1, c).index_select(0, self.site_rows(p)).view(n, self.num_kept, p, p, c)

    def _scatter_patches(self, x: torch.Tensor, pad: int = 0, images_last: bool = False) -> torch.Tensor:
        """(N, K, p, p, C) kept patches -> zero-filled (N, Hp*p + 2*pad, Wp*p + 2*pad, C) map.

        `pad` zero sites on every side (a conv's padding, without a second copy
        of the map). `images_last`: lay the map out (H, W, N, C) instead.
        """
        n, _, p, _, c = x.shape
        height, width = self.grid_h * p + 2 * pad, self.grid_w * p + 2 * pad
        dense = x.new_zeros(n * height * width, c)
        dense.index_copy_(0, self.site_rows(p, pad, images_last), x.reshape(-1, c))
        return dense.view(height, width, n, c) if images_last else dense.view(n, height, width, c)

    @staticmethod
    def _patchwise_conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        """A conv whose kernel equals its stride, on (N, K, P, P, C_in) patches.

        It never mixes sites of two patches, so it is a space-to-depth
        reshape and one matmul: (N, K, P/s, P/s, C_out).
        """
        n, k, p, _, c = x.shape
        s = conv.stride[0]
        q = p // s
        x = x.reshape(n, k, q, s, q, s, c).permute(0, 1, 2, 4, 3, 5, 6).reshape(n, k, q, q, s * s * c)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (out, ky*kx*in)
        return F.linear(x, weight, conv.bias)

    def stem(self, imgs, conv):
        # Pixels of the kept 32x32 patches only, then the 4x4 stride-4 conv. The images are not
        # channels-last in memory, so advanced indexing on the strided view beats a flat index
        # (which would copy every image first). Indices on axes 1 and 3 are split by a slice,
        # so their (N, K) shape comes first: (N, K, 32, 32, in_chans).
        pixels = imgs.permute(0, 2, 3, 1)
        n, _, _, c = pixels.shape
        blocks = pixels.reshape(n, self.grid_h, PATCH_PIXELS, self.grid_w, PATCH_PIXELS, c)
        return self._patchwise_conv(blocks[self.batch_index, self.rows, :, self.cols], conv)

    def prepare(self, x):
        p = x.shape[2]
        stage_indices(self, p, depthwise_method(x.device.type, p), x.device)

    def depthwise_conv(self, x, conv):
        # Each part by the method that is fastest for this device and stage.
        return visible_depthwise_conv(self, x, conv)

    def downsample(self, x, conv):
        return self._patchwise_conv(x, conv)

    def to_dense(self, x):
        return self._scatter_patches(x).permute(0, 3, 1, 2).contiguous()


class MaskedDenseSites(Sites):
    """Dense (N, H, W, C) maps; masked sites zeroed around every spatial op."""

    def __init__(self, visible: torch.Tensor):
        super().__init__(visible)
        self._multipliers = {}  # (sites per patch, dtype) -> (N, H, W, 1) 0/1 tensor

    def _visible_at(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 1) 0/1 multiplier at the resolution of channels-last x (made once per stage)."""
        return self._multiplier(x.shape[1] // self.grid_h, x.dtype)

    def _multiplier(self, p: int, dtype: torch.dtype) -> torch.Tensor:
        key = (p, dtype)
        if key not in self._multipliers:
            vis = self.visible.repeat_interleave(p, 1).repeat_interleave(p, 2)
            self._multipliers[key] = vis.unsqueeze(-1).to(dtype)
        return self._multipliers[key]

    def prepare(self, x):
        p = x.shape[1] // self.grid_h
        self._multiplier(p, x.dtype)
        if torch.is_autocast_enabled(x.device.type):  # the blocks' MLP also zeroes maps of the autocast dtype
            self._multiplier(p, torch.get_autocast_dtype(x.device.type))

    def zero_masked(self, x):
        return x * self._visible_at(x)

    def stem(self, imgs, conv):
        return self.zero_masked(conv(imgs).permute(0, 2, 3, 1))

    def depthwise_conv(self, x, conv):
        x = self.zero_masked(x)
        return self.zero_masked(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def downsample(self, x, conv):
        x = self.zero_masked(x)
        return self.zero_masked(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def to_dense(self, x):
        return self.zero_masked(x).permute(0, 3, 1, 2).contiguous()
