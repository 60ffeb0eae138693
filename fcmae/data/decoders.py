"""The one place that chooses which library decodes 16-bit PNGs and batches of JPEGs (nvJPEG on the GPU).

torchvision's image decoding (`torchvision.io.decode_png` / `decode_jpeg`)
is deprecated since torchvision 0.29 and superseded by TorchCodec
(`torchcodec.decoders`). `DECODER` names the library this process uses:

- 'torchcodec' when `torchcodec.decoders` imports (the `codec` extra:
  `pip install fcmae[codec]`; TorchCodec needs Python >= 3.10 and a recent torch);
- else 'torchvision', the fallback for an older torch without TorchCodec;
- else 'none' (no TorchCodec, and a torchvision without image decoding): then
  16-bit PNGs and decode='gpu' raise ImportError saying what to install.

Both give the same pixels: 16-bit PNGs bit for bit (grey, grey+alpha, RGB,
RGBA), and JPEGs on the CPU (tests/data/test_decoders.py). Both raise
RuntimeError for a corrupt image, which the callers treat as unreadable
(fcmae.data.image_io.UNREADABLE_IMAGE_ERRORS).

8-bit images are not decoded here: Pillow reads them (fcmae.data.image_io),
because it decodes a JPEG at 1/2, 1/4 or 1/8 size when the crop allows it
(`Image.draft`), which neither library does.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
import torchvision

try:
    import torchcodec
    import torchcodec.decoders as codec
    CODEC_PROBLEM = ""
except (ImportError, OSError, RuntimeError) as e:  # absent, or its native library does not load with this torch
    codec = None
    CODEC_PROBLEM = f"{type(e).__name__}: {e}".splitlines()[0]
try:
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png
except ImportError:  # a torchvision after the removal of its image decoding
    ImageReadMode = decode_jpeg = decode_png = None

DECODER = "torchcodec" if codec is not None else "torchvision" if decode_png is not None else "none"


def decoder_description() -> str:
    """`DECODER` with its version, and why TorchCodec is not used when it is not (for fcmae.tools.env)."""
    if DECODER == "torchcodec":
        return f"torchcodec {torchcodec.__version__}"
    fallback = f"torchvision {torchvision.__version__}" if DECODER == "torchvision" else "none"
    return f"{fallback} (TorchCodec not importable: {CODEC_PROBLEM}; pip install 'fcmae[codec]')"


def _require_decoder(what: str) -> None:
    if DECODER == "none":
        raise ImportError(f"{what} needs TorchCodec (pip install 'fcmae[codec]'), and it is not importable "
                          f"({CODEC_PROBLEM}); this torchvision {torchvision.__version__} decodes no images")


def decode_png16(data: bytes) -> np.ndarray:
    """A 16-bit PNG's pixels as stored (grey, grey+alpha, RGB or RGBA): a (C, H, W) uint16 array.

    Args:
        data: the PNG file's bytes; its header must say 16 bits per sample (fcmae.data.image_io.png_header).
    """
    _require_decoder("reading a 16-bit PNG")
    if DECODER == "torchcodec":
        pixels = codec.decode_png(data, mode="UNCHANGED", output_dtype=torch.uint16)
    else:
        pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    if pixels.dtype != torch.uint16:
        raise RuntimeError(f"the PNG decoder gave {pixels.dtype} samples for a 16-bit PNG")
    return pixels.view(torch.int16).numpy().view(np.uint16)  # uint16 .numpy() is missing from older torch


def decode_jpegs(datas: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """Decode JPEGs as RGB on `device` in one call (batched nvJPEG on a CUDA device): (3, H, W) uint8 tensors.

    Args:
        datas: each JPEG file's bytes as a 1-D uint8 tensor on the CPU.
        device: 'cpu' (libjpeg) or a CUDA device (nvJPEG).
    """
    _require_decoder("decode 'gpu'")
    if DECODER == "torchcodec":
        return list(codec.decode_jpeg(list(datas), mode="RGB", device=device))
    return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
