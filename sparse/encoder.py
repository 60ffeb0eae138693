"""The ConvNeXt V2 encoder that computes on visible sites only.

Parameter names and shapes follow timm's channels-last `convnextv2_<size>`
(stem.0, stem.1, stages.i.downsample.{0,1}, stages.i.blocks.j.{conv_dw,
norm, mlp.fc1, mlp.grn, mlp.fc2}), so converting to the dense model is
mostly renaming (fcmae.weights.layouts). All backends share these parameters:
a backend only decides how the forward pass stores the visible sites
(sparse.sites), so any checkpoint runs with any backend.
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from sparse.sites import PATCH_PIXELS, MaskedDenseSites, PatchSites, Sites
from sparse.sizes import check_size, resolve_arch, size_of


def is_compiling() -> bool:
    """True while torch.compile traces the code, False in eager mode."""
    return torch.compiler.is_compiling()


BACKENDS = ("torch", "dense-masked", "minkowski")


def sites_class(backend: str):
    """The `Sites` class of a backend; a clear error for unknown or unavailable ones."""
    if backend == "torch":
        return PatchSites
    if backend == "dense-masked":
        return MaskedDenseSites
    if backend == "minkowski":
        from sparse.minkowski import MinkowskiSites  # raises a clear error when ME is absent

        return MinkowskiSites
    raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


class GRN(nn.Module):
    """Global Response Normalization with per-image statistics over visible sites."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        return sites.global_response_norm(x, self.weight, self.bias, self.eps)


class Mlp(nn.Module):
    """Linear(C, 4C) -> GELU -> GRN(4C) -> Linear(4C, C), on the channel axis."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.grn = GRN(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.grn(sites.zero_masked(x), sites)
        return self.fc2(x)


class Block(nn.Module):
    """ConvNeXt V2 block: dwconv 7x7 -> LN -> MLP with GRN -> drop path -> residual."""

    #: regional compilation (fcmae.runtime.device.compile_regions) compiles each block on its own
    compile_region = True

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path_rate = drop_path

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        y = sites.depthwise_conv(x, self.conv_dw)
        y = self.mlp(self.norm(y), sites)
        y = sites.zero_masked(y)
        return x + sites.drop_path(y, self.drop_path_rate, self.training)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path_rate}"


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, drop_path_rates: Sequence[float], downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                nn.LayerNorm(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.ModuleList(Block(dim, drop_path_rates[j]) for j in range(depth))

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        if isinstance(self.downsample, nn.Sequential):
            norm, conv = self.downsample
            x = sites.downsample(norm(x), conv)
        sites.prepare(x)
        for block in self.blocks:
            x = block(x, sites)
        return x


class SparseConvNeXtV2(nn.Module):
    """ConvNeXt V2 backbone (no head) over the visible 32x32 patches of each image.

    forward(imgs, mask): imgs (N, 3, H, W) with H, W multiples of 32; mask
    (N, L), L = (H/32)*(W/32), 1 = masked (removed), 0 = visible; None means
    nothing masked. Returns the (N, dims[-1], H/32, W/32) feature map with
    exact zeros at masked sites.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        backend: str = "torch",
        size: Optional[str] = None,
    ):
        super().__init__()
        self.depths, self.dims, self.size = tuple(depths), tuple(dims), size
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), nn.LayerNorm(dims[0], eps=1e-6)
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            in_dim = dims[i - 1] if i else dims[0]
            stages.append(Stage(in_dim, dim, depth, rates[start:start + depth], downsample=i > 0))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.set_backend(backend)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def set_backend(self, backend: str) -> "SparseConvNeXtV2":
        """Switch how the forward pass computes; parameters are shared by all backends."""
        self.sites_class = sites_class(backend)
        self.backend = backend
        return self

    def extra_repr(self) -> str:
        return f"size={self.size}, depths={self.depths}, dims={self.dims}, backend={self.backend!r}"

    def visible_grid(
        self, imgs: torch.Tensor, mask: Optional[torch.Tensor], num_kept: Optional[int] = None
    ) -> Tuple[torch.Tensor, int]:
        """Validate the inputs; return the (N, H/32, W/32) bool map of kept patches and the kept count.

        Shapes, dtypes and devices are always checked (free: no tensor value is
        read). The mask's values are checked only for a mask whose kept count
        the caller does not vouch for (`num_kept` None), and only in eager
        mode: reading values is a device-to-host sync, and a graph break under
        torch.compile.
        """
        if not torch.is_tensor(imgs) or imgs.dim() != 4:
            shape = tuple(imgs.shape) if torch.is_tensor(imgs) else type(imgs).__name__
            raise ValueError(f"imgs must be a (N, {self.in_chans}, H, W) tensor, got {shape}")
        n, c, h, w = imgs.shape
        if c != self.in_chans:
            raise ValueError(f"imgs must have {self.in_chans} channels, got {c} (shape {tuple(imgs.shape)})")
        if h % PATCH_PIXELS or w % PATCH_PIXELS or h == 0 or w == 0:
            raise ValueError(f"image height and width must be positive multiples of {PATCH_PIXELS}, got {h}x{w}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")
        param = self.stem[0].weight
        if imgs.device != param.device:
            raise ValueError(f"imgs are on {imgs.device} but the encoder's weights are on {param.device}")
        grid_h, grid_w = h // PATCH_PIXELS, w // PATCH_PIXELS
        if mask is None:
            return torch.ones(n, grid_h, grid_w, dtype=torch.bool, device=imgs.device), grid_h * grid_w
        if not torch.is_tensor(mask) or tuple(mask.shape) != (n, grid_h * grid_w):
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(
                f"mask must have shape (N, L) = ({n}, {grid_h * grid_w}) for {h}x{w} images "
                f"(one entry per {PATCH_PIXELS}x{PATCH_PIXELS} patch, 1 = masked), got {shape}"
            )
        if mask.device != imgs.device:
            raise ValueError(f"mask is on {mask.device} but imgs are on {imgs.device}")
        if mask.is_complex():
            raise ValueError("mask values must be 0 (visible) or 1 (masked)")
        visible = (mask == 0).reshape(n, grid_h, grid_w)
        if num_kept is None and not is_compiling():
            num_kept = self._check_mask_values(mask, visible)
        elif num_kept is None and self.sites_class.needs_equal_keep:
            # Compiled, and nobody said how many patches are kept: read it (a graph break).
            num_kept = int(visible[0].sum()) if n else 0
        return visible, num_kept

    def _check_mask_values(self, mask: torch.Tensor, visible: torch.Tensor) -> Optional[int]:
        """Clear errors for a user's bad mask (eager only); the kept count per image, if it is one count."""
        if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("mask values must be 0 (visible) or 1 (masked)")
        n = visible.shape[0]
        kept = visible.reshape(n, -1).sum(1).tolist()
        if self.sites_class.needs_equal_keep and len(set(kept)) > 1:
            raise ValueError(
                f"the {self.backend!r} backend needs the same number of visible patches in every "
                f"image, got {kept} (FCMAE masks always keep the same count; use "
                f"backend='dense-masked' for arbitrary masks)"
            )
        return kept[0] if n and len(set(kept)) == 1 else None

    def forward(
        self, imgs: torch.Tensor, mask: Optional[torch.Tensor] = None, num_kept: Optional[int] = None
    ) -> torch.Tensor:
        """Features of the visible patches; see the class docstring.

        Args:
            imgs: (N, in_chans, H, W) images, H and W multiples of 32.
            mask: (N, L) patch mask, 1 = masked; None keeps every patch.
            num_kept: visible patches per image, when the caller knows it (a
                mask drawn by `sparse.masking.random_mask` keeps
                `num_kept(L, mask_ratio)`). The caller vouches for the mask, so
                its values are not checked: no host sync, no graph break. None
                reads (and checks) it from the mask in eager mode.
        """
        visible, num_kept = self.visible_grid(imgs, mask, num_kept)
        if self.sites_class.needs_equal_keep:
            sites = self.sites_class(visible, num_kept)
        else:
            sites = self.sites_class(visible)
        x = self.stem[1](sites.stem(imgs, self.stem[0]))
        for stage in self.stages:
            x = stage(x, sites)
        return sites.to_dense(x)


def build_encoder(
    size: str,
    backend: str = "torch",
    depths: Optional[Sequence[int]] = None,
    dims: Optional[Sequence[int]] = None,
    drop_path_rate: float = 0.0,
    **kwargs,
) -> SparseConvNeXtV2:
    """The sparse ConvNeXt V2 encoder of a registered size; depths/dims override it."""
    name = check_size(size)
    depths, dims = resolve_arch(name, depths, dims)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    return SparseConvNeXtV2(
        depths, dims, drop_path_rate=drop_path_rate, backend=backend, size=size_of(depths, dims), **kwargs
    )
