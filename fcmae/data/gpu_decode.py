"""GPU JPEG decoding for pre-training (`decode='gpu'`): nvJPEG through TorchCodec, crops on the GPU.

The loader workers do what is cheap on the CPU: read the file's bytes and
its header, and draw the crop box and flip exactly as the CPU path does
(fcmae.data.folder.sample_crop, on the full image's size, seeded per sample). The
batch then travels as compressed bytes; `GpuJpegDecoder` decodes it with
`fcmae.data.decoders.decode_jpegs(list, 'cuda')` (batched nvJPEG:
TorchCodec's `decode_jpeg`, or torchvision's where TorchCodec is absent),
crops each box, resizes it to input_size (bicubic, antialiased), flips and
normalises on the GPU. So the augmentation distribution is the CPU path's;
the pixels differ only by the decoder and resampler (bicubic in torch
instead of Pillow), within a few levels of 255.

Images nvJPEG is not given: non-JPEG files and CMYK/YCCK JPEGs met during
training are decoded and cropped on the CPU in the worker (the same crop)
and travel as uint8 crops. A batch nvJPEG rejects (a corrupt file) is
decoded image by image; an image that fails on the GPU is decoded on the
CPU (Pillow), and one that fails there too is replaced by another image of
the batch, with a warning (`GpuJpegDecoder.failed` counts them).

Selection (`resolve_decode`): 'cpu'; 'gpu' (needs CUDA, 8-bit 3-channel
JPEG data: the headers checked at start must all be JPEG, else a clear
error); 'auto' = 'gpu' when CUDA is available and the checked headers are
all 3-channel 8-bit JPEGs, else 'cpu'.

Status: the CPU tests run this code with device='cpu' (the CPU JPEG
decoder of TorchCodec and of torchvision) and compare it with the CPU path;
the test marked `cuda` runs it on a GPU where one exists.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from fcmae.data.decoders import decode_jpegs
from fcmae.data.image_io import UNREADABLE_IMAGE_ERRORS, DataError

DECODE_MODES = ("cpu", "gpu", "auto")


def resolve_decode(decode: str, infos: Sequence, in_chans: int, dtype: str, cuda: Optional[bool] = None) -> str:
    """'cpu' or 'gpu' for `decode` given the checked headers (fcmae.data.image_io.ImageInfo); DataError if
    impossible."""

    if decode not in DECODE_MODES:
        raise DataError(f"unknown decode {decode!r}; choose one of: {', '.join(DECODE_MODES)}")
    if decode == "cpu":
        return "cpu"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    non_jpeg = next((info for info in infos if not info.is_jpeg), None)
    usable = in_chans == 3 and dtype == "uint8" and non_jpeg is None
    if decode == "auto":
        return "gpu" if cuda and usable else "cpu"
    if not cuda:
        raise DataError("decode 'gpu' needs a CUDA device, and none is available; use decode 'cpu' or 'auto'")
    if in_chans != 3 or dtype != "uint8":
        raise DataError(f"decode 'gpu' decodes 8-bit RGB JPEGs only; this data set has in_chans={in_chans} of "
                        f"{dtype}: use decode 'cpu' or 'auto'")
    if non_jpeg is not None:
        raise DataError(f"decode 'gpu' decodes JPEGs only, and {non_jpeg.path} is not one: use decode 'cpu', or "
                        f"'auto' (which picks the CPU for such folders)")
    return "gpu"


@dataclass
class EncodedImage:
    """One sample for GPU decoding: the JPEG file's bytes and its box (top, left, h, w, flip) in full-size pixels."""

    data: torch.Tensor
    box: torch.Tensor


@dataclass
class EncodedBatch:
    """A collated batch: per sample either JPEG bytes (`data[i]`, box `boxes[i]`) or a ready uint8 crop."""

    data: List[Optional[torch.Tensor]]
    boxes: torch.Tensor
    crops: List[Optional[torch.Tensor]]

    @staticmethod
    def collate(items: Sequence) -> "EncodedBatch":
        data = [x.data if isinstance(x, EncodedImage) else None for x in items]
        boxes = torch.stack([x.box if isinstance(x, EncodedImage) else torch.zeros(5, dtype=torch.int64)
                             for x in items])
        crops = [None if isinstance(x, EncodedImage) else x for x in items]
        return EncodedBatch(data, boxes, crops)

    def __len__(self) -> int:
        return len(self.data)

    def pin_memory(self) -> "EncodedBatch":  # called by DataLoader(pin_memory=True)
        return self


class GpuJpegDecoder:
    """Turn an `EncodedBatch` into a normalised (N, 3, S, S) float tensor on `device`.

    Args:
        input_size: S, the side of the square crops.
        mean, std: per-channel normalisation on the [0, 1] scale.
        device: where to decode ('cuda', 'cuda:1', ...; 'cpu' runs the same steps with the CPU decoder).
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], device):
        self.size = int(input_size)
        self.device = torch.device(device)
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, -1, 1, 1).to(self.device)
        self.shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
                      ).view(1, -1, 1, 1).to(self.device)
        self.failed = 0

    def _decode(self, datas: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        try:
            return decode_jpegs(datas, self.device)
        except RuntimeError:
            out = []
            for data in datas:  # find the culprit(s): one by one
                try:
                    out.append(decode_jpegs([data], self.device)[0])
                except RuntimeError:
                    out.append(_decode_on_cpu(data))
            return out

    def crop(self, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, S, S) float in 0..255: crop, bicubic antialiased resize, flip."""
        top, left, h, w, flip = (int(v) for v in box)
        crop = image[None, :, top:top + h, left:left + w].float()
        if (h, w) != (self.size, self.size):
            crop = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bicubic",
                                                   align_corners=False, antialias=True)
        crop = crop.clamp_(0, 255).round_()  # as the CPU path's 8-bit crop
        return crop.flip(-1)[0] if flip else crop[0]

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        jpeg_index = [i for i, d in enumerate(batch.data) if d is not None]
        decoded = self._decode([batch.data[i] for i in jpeg_index]) if jpeg_index else []
        out: List[Optional[torch.Tensor]] = [None] * len(batch)
        for i, image in zip(jpeg_index, decoded):
            if image is not None:
                out[i] = self.crop(image.to(self.device), batch.boxes[i])
        for i, crop in enumerate(batch.crops):
            if crop is not None:
                out[i] = crop.to(self.device, non_blocking=True).float()
        good = next((x for x in out if x is not None), None)
        if good is None:
            raise RuntimeError("no image of the batch could be decoded")
        missing = sum(x is None for x in out)
        if missing:
            self.failed += missing
            warnings.warn(f"{missing} image(s) of a batch could not be decoded and were replaced by another")
        images = torch.stack([x if x is not None else good for x in out])
        return images.mul_(self.scale).sub_(self.shift)


def _decode_on_cpu(data: torch.Tensor) -> Optional[torch.Tensor]:
    """Pillow's decode of JPEG bytes as a (3, H, W) uint8 tensor, or None when it fails too."""

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    except UNREADABLE_IMAGE_ERRORS:
        return None
