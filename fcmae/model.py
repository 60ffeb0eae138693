"""FCMAE: the sparse ConvNeXt V2 encoder, a light dense decoder and the masked-patch loss.

    imgs (N, 3, H, W), mask (N, L), 1 = masked
      -> encoder (visible patches only)            (N, C, H/32, W/32), zeros at masked sites
      -> proj: 1x1 conv to decoder_dim
      -> masked sites replaced by mask_token
      -> decoder: ConvNeXt V2 block(s) with GRN    (N, D, H/32, W/32)
      -> pred: 1x1 conv to 32*32*3 per site        (N, L, 3072)
      -> loss: MSE to the (per-patch normalised) pixels, over masked patches only

Parameter names follow the reference release (encoder.*, proj, mask_token,
decoder.<i>, pred), so finetune.convert can take the encoder out.
"""

import inspect
import re
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock

import sparse
from sparse.depthwise import DepthwiseConv2d
from sparse.encoder import is_compiling
from sparse.grn import GlobalResponseNorm
from sparse.masking import PATCH_SIZE, check_mask_ratio, num_kept, patchify, random_mask, unpatchify


def _patch_statistics(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centred patches, mean, std) of (N, L, D) patches, std from the unbiased variance + 1e-6: norm_pix_loss's.

    The variance is the squared norm of the centred patches: on CPU, at atto's
    batch of 16 at 224 pixels, torch's `var` over the last axis took 8 ms and
    a square-and-sum of the centred patches 5 ms, against about 1 ms for this
    (one centring pass and one reduction, no squared copy).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    centred = patches - mean
    var = torch.linalg.vector_norm(centred, dim=-1, keepdim=True).square() / (patches.shape[-1] - 1)
    return centred, mean, (var + 1.0e-6) ** 0.5


def _patch_mean_std(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std of (N, L, D) patches (`_patch_statistics`)."""
    return _patch_statistics(patches)[1:]


# Kernels the reference release initialises with trunc_normal_'s default std (1.0): stem, depthwise and
# pointwise kernels, proj and pred; the decoder's pointwise layers keep their init.
_REFERENCE_INIT = re.compile(r"^(encoder\.stem\.0|encoder\..*\.(conv_dw|mlp\.fc[12])|decoder\.\d+\.conv_dw|proj|pred)"
                             r"\.weight$")


def _decoder_block(dim: int) -> ConvNeXtBlock:
    """timm's ConvNeXt V2 block with two drop-in parts that are faster on CPU (same parameters and names).

    sparse.depthwise's DepthwiseConv2d (the depthwise weight gradient as
    one grouped conv) and sparse.grn's GRN (a hand-written backward).
    """
    block = ConvNeXtBlock(dim, ls_init_value=None, use_grn=True, conv_mlp=False)
    block.conv_dw = DepthwiseConv2d(dim)
    block.mlp.grn = GlobalResponseNorm(block.mlp.grn.weight.numel())
    return block


class FCMAE(nn.Module):
    """The sparse `encoder` with the decoder and loss of FCMAE.

    Args:
        img_size: training image side (a multiple of patch_size).
        patch_size: the encoder's total stride (32).
        mask_ratio: share of patches hidden per image.
        decoder_dim, decoder_depth: width and number of the decoder's ConvNeXt V2 blocks.
        norm_pix_loss: whether the target pixels are normalised per patch.
        in_chans: image channels (the encoder's, and p*p*in_chans predictions per patch).
        init_std: std of the truncated-normal init of the kernels in _REFERENCE_INIT (1.0: the reference's).
    """

    def __init__(
        self,
        encoder: nn.Module,
        img_size: int = 224,
        patch_size: int = PATCH_SIZE,
        mask_ratio: float = 0.6,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        in_chans: int = 3,
        init_std: float = 0.02,
    ):
        super().__init__()
        if patch_size != PATCH_SIZE:
            raise ValueError(f"the encoder's total stride is {PATCH_SIZE}, so patch_size must be {PATCH_SIZE}, "
                             f"got {patch_size}")
        if img_size % patch_size or img_size <= 0:
            raise ValueError(f"img_size must be a positive multiple of {patch_size}, got {img_size}")
        if decoder_depth < 1 or decoder_dim < 1:
            raise ValueError(f"decoder_dim and decoder_depth must be positive, got {decoder_dim}, {decoder_depth}")
        check_mask_ratio(mask_ratio, (img_size // patch_size) ** 2)
        if getattr(encoder, "in_chans", in_chans) != in_chans:
            raise ValueError(f"the encoder takes {encoder.in_chans} input channels but in_chans is {in_chans}")
        self.img_size, self.patch_size, self.mask_ratio = img_size, patch_size, float(mask_ratio)
        self.norm_pix_loss, self.in_chans = bool(norm_pix_loss), in_chans
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth

        self.encoder = encoder
        self.proj = nn.Conv2d(encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[_decoder_block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, patch_size * patch_size * in_chans, kernel_size=1)

        nn.init.normal_(self.mask_token, std=0.02)
        for part in (self.proj, self.decoder, self.pred):
            part.apply(self._init_weights)
        if init_std != 0.02:  # 1.0: the reference release's init (docs/PUBLISHED_SETTINGS.md)
            for name, param in self.named_parameters():
                if _REFERENCE_INIT.match(name):
                    trunc_normal_(param, std=init_std)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def no_weight_decay(self):
        """Names of parameters without weight decay besides biases and 1-d ones (norms, GRN)."""
        return {"mask_token"}

    def set_backend(self, backend: str) -> "FCMAE":
        self.encoder.set_backend(backend)
        return self

    def grid_size(self, imgs: torch.Tensor) -> Tuple[int, int]:
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def random_mask(self, imgs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        gh, gw = self.grid_size(imgs)
        return random_mask(imgs.shape[0], gh * gw, self.mask_ratio, device=imgs.device, generator=generator)

    def forward_decoder(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder map (N, C, gh, gw) -> predictions (N, L, p*p*in_chans).

        `proj` and `pred` are 1x1 convs (the reference release's parameter
        shapes), computed as Linear layers on channels-last sites: on CPU the
        same product takes about 0.6x the time of a 1x1 conv on an NCHW map.
        """
        n, _, gh, gw = features.shape
        x = F.linear(features.permute(0, 2, 3, 1), self.proj.weight.flatten(1), self.proj.bias)  # (N, gh, gw, D)
        m = mask.reshape(n, gh, gw, 1).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype).reshape(1, 1, 1, -1) * m
        x = self.decoder(x.permute(0, 3, 1, 2))  # (N, D, gh, gw), channels-last memory
        return F.linear(x.permute(0, 2, 3, 1).reshape(n, gh * gw, -1), self.pred.weight.flatten(1), self.pred.bias)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*in_chans) patches, normalised per patch when norm_pix_loss."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            centred, _, std = _patch_statistics(target)
            target = centred.div_(std)
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch (mean over its p*p*in_chans values), averaged over masked patches only."""
        per_patch = ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def num_kept(self, imgs: torch.Tensor) -> int:
        """Visible patches per image of the masks this model draws (from shapes and the ratio)."""
        gh, gw = self.grid_size(imgs)
        return num_kept(gh * gw, self.mask_ratio)

    def forward(self, imgs: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """Returns (loss, pred (N, L, p*p*in_chans), mask (N, L), 1 = masked).

        With mask=None (training) the mask is drawn here and is correct by
        construction: nothing reads a tensor value, so the step has no host
        sync and compiles to one graph. A mask passed in is checked in eager
        mode (clear errors; a few host syncs); under torch.compile it must keep
        `self.num_kept(imgs)` patches per image, as `random_mask` does.
        """
        if mask is None:
            mask = self.random_mask(imgs)
            kept = self.num_kept(imgs)
        elif is_compiling():
            kept = self.num_kept(imgs)
        else:
            if torch.is_tensor(mask) and mask.numel() and float(mask.sum()) == 0:
                raise ValueError("the mask hides no patch, so there is nothing to reconstruct (the loss is undefined)")
            kept = None  # the encoder checks the mask and reads the count
        features = self.encoder(imgs, mask, num_kept=kept)
        pred = self.forward_decoder(features, mask)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def unpatchify(self, pred: torch.Tensor, imgs_or_grid) -> torch.Tensor:
        """(N, L, p*p*in_chans) -> (N, in_chans, H, W); the grid comes from an image batch or a (gh, gw) pair."""
        grid = self.grid_size(imgs_or_grid) if torch.is_tensor(imgs_or_grid) else tuple(imgs_or_grid)
        return unpatchify(pred, grid, self.patch_size, self.in_chans)

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predictions as images in the input's space (per-patch statistics of `imgs` put back)."""
        pred = pred.float()
        if self.norm_pix_loss:
            mean, std = _patch_mean_std(patchify(imgs.float(), self.patch_size))
            pred = pred * std + mean
        return self.unpatchify(pred, imgs)


# FCMAE's own settings: its constructor's keywords besides the encoder and in_chans (build_fcmae sorts by them).
FCMAE_SETTINGS = tuple(name for name in inspect.signature(FCMAE).parameters if name not in ("encoder", "in_chans"))


def build_fcmae(size: str, *, backend: str = "torch", in_chans: int = 3, **overrides) -> FCMAE:
    """FCMAE around the sparse encoder of `size` (e.g. 'atto' or 'convnextv2_atto').

    Args:
        size: a registered size (sparse.sizes).
        backend: the sparse encoder's backend (torch, dense-masked, minkowski).
        in_chans: image channels; the encoder's stem and the prediction layer (p*p*in_chans per patch)
            follow it.
        overrides: FCMAE's own settings (FCMAE_SETTINGS: img_size, mask_ratio, decoder_dim, ...; see
            `FCMAE`) go to the model, the rest to `sparse.build_encoder` (depths, dims, drop_path_rate).
    """
    settings = {name: overrides.pop(name) for name in FCMAE_SETTINGS if name in overrides}
    encoder = sparse.build_encoder(size, backend=backend, in_chans=in_chans, **overrides)
    return FCMAE(encoder, in_chans=in_chans, **settings)
