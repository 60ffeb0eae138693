"""Crops: where a random crop falls (`sample_crop`), and cutting and resizing it from a Pillow image or an array;
`TensorEvalTransform`, evaluation's resize and centre crop on tensors.

Photographs are cropped by Pillow at reduced size where the crop allows
(libjpeg's DCT scaling, `dct_scale`); domain images (16-bit, multi-channel,
.npy) as float tensors with torch's antialiased bicubic resize.
"""

from typing import Sequence, Tuple

import torch
from PIL import Image
from torchvision import transforms

from fcmae.data.image_io import pil_target_mode


def sample_crop(height: int, width: int, scale: Sequence[float] = (0.2, 1.0),
                ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> Tuple[Tuple[int, int, int, int], bool]:
    """((top, left, h, w), flip) drawn from torch's global RNG exactly as torchvision draws them.

    The same draws, in the same order, as `RandomResizedCrop.get_params` on a
    height x width image followed by `RandomHorizontalFlip` (p = 0.5): only
    the image's size is needed, so the box is chosen before decoding.
    """
    size_only = torch.zeros(()).expand(1, height, width)  # get_params reads the shape only; no memory
    top, left, h, w = transforms.RandomResizedCrop.get_params(size_only, list(scale), list(ratio))
    flip = bool(torch.rand(1) < 0.5)
    return (int(top), int(left), int(h), int(w)), flip


def dct_scale(box_h: int, box_w: int, out_h: int, out_w: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) that keeps the crop at least out_h x out_w pixels."""
    for k in (8, 4, 2):
        if box_h >= k * out_h and box_w >= k * out_w:
            return k
    return 1


def pil_crop(image: Image.Image, box: Tuple[int, int, int, int], size: int, in_chans: int,
             fast: bool = True) -> Image.Image:
    """Crop `box` = (top, left, height, width), given in full-image pixels, and resize it to size x size (bicubic).

    `image` must be opened and not yet loaded. For JPEGs (with `fast`) it is
    decoded at the largest DCT reduction that keeps the crop at least
    size x size (`Image.draft`); the box is mapped onto the smaller image
    with sub-pixel precision, so the crop covers the same part of the photo.
    """
    top, left, h, w = box
    full_w, full_h = image.size
    mode = pil_target_mode(in_chans)
    if fast and image.format == "JPEG":
        k = dct_scale(h, w, size, size)
        if k > 1:
            image.draft(mode if mode == "L" else "RGB", (full_w // k, full_h // k))
    if mode is not None and image.mode not in (mode, "L"):
        image = image.convert(mode)  # palette, CMYK, RGBA...: convert before resampling
    sx, sy = image.width / full_w, image.height / full_h
    out = image.resize((size, size), Image.BICUBIC, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    if mode is not None and out.mode != mode:
        out = out.convert(mode)  # grey -> RGB after resampling: the same pixels, a third of the work
    return out


def array_crop(array: torch.Tensor, box: Tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop (C, H, W) float `array` to `box` and resize to size x size (bicubic, antialiased, not clamped)."""
    top, left, h, w = box
    crop = array[None, :, top:top + h, left:left + w].float()
    if (h, w) == (size, size):
        return crop[0]
    return torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False,
                                           antialias=True)[0]


class TensorEvalTransform:
    """(C, H, W) float in [0, 1] -> shorter side to input_size / crop_pct (bicubic), centre crop, normalise.

    Fine-tuning's evaluation transform (finetune.data) and the reconstruction picture's fixed batch.
    """

    def __init__(self, input_size: int, crop_pct: float, mean, std):
        self.size, self.crop_pct = int(input_size), float(crop_pct)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        short = int(self.size / self.crop_pct)
        th, tw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        x = torch.nn.functional.interpolate(image[None].float(), size=(th, tw), mode="bicubic", align_corners=False,
                                            antialias=True)[0]
        top, left = (th - self.size) // 2, (tw - self.size) // 2
        return (x[:, top:top + self.size, left:left + self.size] - self.mean) / self.std
