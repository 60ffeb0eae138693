"""Reconstruction pictures: original | masked input | reconstruction | reconstruction + visible.

One row per image. The reconstruction is shown in image space: with
norm_pix_loss the predictions are per-patch normalised, so each patch's mean
and standard deviation (taken from the original) are put back first.
Images of 1 channel are shown grey; of 2 channels, the first one grey; of
more than 3 channels, their first three as red, green and blue.

`with_titles` puts a heading (the epoch) and each column's title above the
grid, in Pillow's built-in font (no font files needed).
"""

from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fcmae.data.folder import IMAGENET_MEAN, IMAGENET_STD
from fcmae.runtime.files import write_atomic
from sparse.masking import upsample_mask


def _to_uint8(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) normalised -> (N, H, W, 3) uint8: grey for C < 3, the first three channels for C >= 3."""
    c = imgs.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    x = (imgs.float().cpu() * s + m).clamp(0, 1)
    x = x[:, :3] if c >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, gap: int = 2) -> np.ndarray:
    """An (H', W', 3) uint8 picture: one row per image, four columns (see module docstring)."""
    c = imgs.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    recon = model.reconstruct(imgs, pred).cpu()
    imgs = imgs.float().cpu()
    pix_mask = upsample_mask(mask.float().cpu(), model.grid_size(imgs), model.patch_size)  # 1 = masked
    masked_input = imgs * (1 - pix_mask) + pix_mask * _gray(mean, std)
    pasted = imgs * (1 - pix_mask) + recon * pix_mask
    columns = [_to_uint8(t, mean, std) for t in (imgs, masked_input, recon, pasted)]
    n, h, w, _ = columns[0].shape
    canvas = np.full((n * h + (n - 1) * gap, 4 * w + 3 * gap, 3), 255, dtype=np.uint8)
    for i in range(n):
        for j, col in enumerate(columns):
            y, x = i * (h + gap), j * (w + gap)
            canvas[y:y + h, x:x + w] = col[i].numpy()
    return canvas


COLUMN_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")


def with_titles(grid: np.ndarray, heading: str, gap: int = 2) -> np.ndarray:
    """`grid` (from reconstruction_grid) below a white band: `heading` on its first line, then each column's
    title (COLUMN_TITLES), wrapped to the column's width. The font shrinks (down to 6 pixels) until the longest
    word of a title fits a column."""
    column = (grid.shape[1] - 3 * gap) // 4
    font = _font_fitting(max((w for t in COLUMN_TITLES for w in t.split()), key=len), column)
    titles = [_wrap(title, font, column) for title in COLUMN_TITLES]
    line = _text_height(font) + 2
    band = Image.new("RGB", (grid.shape[1], line * (1 + max(map(len, titles))) + 4), "white")
    draw = ImageDraw.Draw(band)
    draw.text((1, 1), heading, fill="black", font=font)
    for j, lines in enumerate(titles):
        for k, text in enumerate(lines):
            draw.text((j * (column + gap) + 1, line * (1 + k) + 1), text, fill="black", font=font)
    return np.concatenate([np.asarray(band), grid], axis=0)


def _font_fitting(word: str, width: int):
    """Pillow's default font at the largest size from 11 to 6 pixels at which `word` fits `width`."""
    for size in range(11, 5, -1):
        font = ImageFont.load_default(size=size)
        if font.getlength(word) <= width - 2 or not isinstance(font, ImageFont.FreeTypeFont):
            return font  # a Pillow built without FreeType has one bitmap size only
    return font


def _text_height(font) -> int:
    return font.getbbox("Ag")[3]  # the bottom of a tall and a descending letter


def _wrap(text: str, font, width: int) -> List[str]:
    """`text` in lines of whole words no wider than `width` (a word wider than that gets a line of its own)."""
    lines: List[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width - 2:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _gray(mean, std) -> torch.Tensor:
    """The normalised value of mid-gray, to paint masked patches."""
    return ((0.5 - torch.tensor(mean)) / torch.tensor(std)).view(1, -1, 1, 1).float()


def save_png(image: np.ndarray, path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG, atomically."""
    return write_atomic(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
