"""Reading training images of any supported kind: headers, full arrays, fast random crops.

`ImageFile` opens a file once and gives its header and then its pixels,
whole or only a crop. A crop of a .npy, or of a TIFF stored uncompressed
in one piece, is read from a memory map (only the parts of the file that
hold it); other files are decoded whole and the crop cut from them. Only
the crop is converted to float, not the whole (large microscopy) image.

Formats and how they are read:

- JPEG, 8-bit PNG, BMP, PPM/PGM, WebP, 8-bit TIFF-less formats: Pillow.
  JPEGs are decoded at 1/2, 1/4 or 1/8 size when the crop allows it
  (libjpeg's DCT scaling through `Image.draft`, see `pil_crop`).
- 16-bit PNG (grey, grey+alpha, RGB, RGBA): fcmae.data.decoders (TorchCodec, else torchvision;
  Pillow reads 16-bit colour PNGs as 8-bit and 16-bit grey ones as I;16).
- TIFF (.tif, .tiff): tifffile; the first series, its own axes metadata
  says where the channels are ('YX' -> 1 channel, 'YXS' -> channels last,
  any other 3-axis order -> channels first).
- NumPy (.npy): (H, W), (H, W, C) or (C, H, W). Which 3-D layout is
  decided, in this order: an explicit `layout` ('HWC' or 'CHW'); else the
  axis (first or last) whose size equals the data set's channel count when
  only one does; else an error asking for `layout` -- it is never guessed.

Values: integer samples are divided by their dtype's maximum (255 for
uint8, 65535 for uint16, ...), so every image lands in [0, 1]; booleans
become 0/1; floating-point arrays are taken as they are (their scale is
the user's). Nothing is clipped.

Channels: a data set has one channel count (`in_chans`) and one sample
dtype. The only conversion is the photograph convention: with
`in_chans` 3 and 8-bit data, Pillow images of any mode (grey, palette,
RGBA, CMYK) are converted to RGB, as torchvision's folder loader does, so
ImageNet's few greyscale and CMYK JPEGs still load. Anything else that
differs is an error naming the file (`check_compatible`): before training
when the header check sees it, else skipped and reported in training like
an unreadable file.
"""

from __future__ import annotations

import io
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from fcmae.data.decoders import decode_png16

PathLike = Union[str, os.PathLike]

LAYOUTS = ("auto", "HWC", "CHW")
ARRAY_SUFFIXES = (".npy",)
TIFF_SUFFIXES = (".tif", ".tiff")
# Channels of each Pillow mode as the file stores it.
PIL_MODE_CHANNELS = {"1": 1, "L": 1, "P": 3, "LA": 2, "PA": 4, "RGB": 3, "RGBA": 4, "RGBX": 4, "CMYK": 4,
                     "YCbCr": 3, "LAB": 3, "HSV": 3, "I;16": 1, "I;16B": 1, "I;16L": 1, "I": 1, "F": 1}
PIL_MODE_DTYPE = {"I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32", "F": "float32"}
PNG_COLOR_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


# What reading an unreadable image file raises: a truncated or corrupt file (OSError; RuntimeError from
# the 16-bit PNG decoder; ValueError from numpy and tifffile), one too large for Pillow, or one not of the
# data set's format (ImageFormatError is a ValueError). Training skips such files and reports them; the header
# check (`check_folder`, where a format mismatch is an error), the channel statistics and pictures skip them.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, RuntimeError, Image.DecompressionBombError)


class DataError(ValueError):
    """Unusable training data; the message says what is wrong and where."""

    exit_code = 2  # bad input, as fcmae.runtime.errors.UsageError


class ImageFormatError(DataError):
    """A file that cannot be used as an image of this data set; the message names the file."""


class UnreadableImageError(DataError):
    """An image file that could not be read where no other file may stand in for it (evaluation), or too many in
    a row; the message names the file.

    torch's DataLoader re-raises an error of a worker as `type(error)(text)`, the text being a header and the
    worker's whole traceback; the message is taken back from its last line, so that it stays one line.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: size, stored channels, sample dtype, and how to read it.

    kind: 'pil' (Pillow, 8-bit or 1-channel 16/32-bit), 'png16' (fcmae.data.decoders),
    'tiff' (tifffile) or 'npy'. layout: 'HW', 'HWC' or 'CHW' (arrays) or ''.
    """

    path: str
    height: int
    width: int
    channels: int
    dtype: str
    kind: str
    mode: str = ""
    layout: str = ""

    @property
    def is_jpeg(self) -> bool:
        return self.kind == "pil" and self.mode != "" and Path(self.path).suffix.lower() in (".jpg", ".jpeg")

    @property
    def bit_depth(self) -> int:
        return np.dtype(self.dtype).itemsize * 8 if self.dtype != "bool" else 1

    def describe(self) -> str:
        return f"{self.channels} channel(s) of {self.dtype}"


def png_header(head: bytes) -> Optional[Tuple[int, int, int, int]]:
    """(width, height, bit depth, colour type) from a file's first 29 bytes when it is a PNG, else None."""
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height, depth, color = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, color


def _array_layout(path: str, shape: Tuple[int, ...], layout: str, in_chans: Optional[int]) -> Tuple[str, int, int, int]:
    """(layout, channels, height, width) of an array of `shape`; see the module docstring for the rule."""
    if layout not in LAYOUTS:
        raise ImageFormatError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if len(shape) == 2:
        return "HW", 1, shape[0], shape[1]
    if len(shape) != 3:
        raise ImageFormatError(f"{path}: an image array must have 2 dimensions (H, W) or 3 ((H, W, C) or "
                               f"(C, H, W)), got shape {tuple(shape)}")
    if layout == "auto":
        first, last = in_chans is not None and shape[0] == in_chans, in_chans is not None and shape[2] == in_chans
        if first == last:
            why = (f"both its first and last axes are {in_chans}" if first
                   else f"neither its first nor its last axis is in_chans={in_chans}")
            raise ImageFormatError(f"{path}: cannot tell (H, W, C) from (C, H, W) for shape {tuple(shape)} ({why}); "
                                   f"set layout: HWC or CHW" + ("" if first else " and check in_chans"))
        layout = "CHW" if first else "HWC"
    if layout == "CHW":
        return "CHW", shape[0], shape[1], shape[2]
    return "HWC", shape[2], shape[0], shape[1]


class ImageFile:
    """An image file opened once: its header at once, its pixels when asked for (whole, or only a crop).

        with ImageFile(path, layout, in_chans) as image:
            image.info                   # the header, as `read_info` gives it
            image.read(in_chans)         # the whole image as stored: (C, H, W), its own dtype
            image.read(in_chans, box)    # only box = (top, left, height, width) of it: (C, h, w)

    What a crop reads: a .npy is memory-mapped, and so is a TIFF whose
    pixels lie uncompressed and contiguous in the file (tifffile's
    `dataoffset`), so only the parts of the file that hold the crop are
    read from disk; other TIFFs, 16-bit PNGs and Pillow images are decoded
    whole and the crop is cut from the decoded pixels. Either way the caller
    converts only the crop to float. Pillow files: `pil` is the opened, not
    yet decoded image and `file` its open file object (None for the other
    kinds).

    An image held in memory (a shard's sample, fcmae.data.shards) is read the same way from its bytes `data`.

    Args:
        path: the image file, or with `data` the name of the image (its suffix says the format).
        layout: 'auto', 'HWC' or 'CHW', for 3-D .npy arrays (see the module docstring).
        in_chans: the data set's channel count, which decides 'auto' layouts.
        dtype: the data set's sample dtype; when given, the header is checked against in_chans channels of it
            (`check_compatible`: ImageFormatError naming the file).
        data: the encoded image itself, when it is not a file.
    """

    def __init__(self, path: PathLike, layout: str = "auto", in_chans: Optional[int] = None,
                 dtype: Optional[str] = None, data: Optional[bytes] = None):
        self.path = str(path)
        self.data = data
        self.file = self.pil = None
        self._array = self._tif = None
        try:
            self.info = self._open(Path(self.path).suffix.lower(), layout, in_chans)
            if dtype is not None:
                check_compatible(self.info, in_chans, dtype)
        except BaseException:
            self.close()
            raise

    def _source(self):  # the file's path, or a file object over the bytes of an image held in memory
        return self.path if self.data is None else io.BytesIO(self.data)

    def _open(self, suffix: str, layout: str, in_chans: Optional[int]) -> ImageInfo:
        path = self.path
        if suffix in ARRAY_SUFFIXES:
            try:
                self._array = np.load(self._source(), mmap_mode="r" if self.data is None else None,
                                      allow_pickle=False)
            except ValueError as e:  # unreadable, like a truncated JPEG: skipped and reported by training
                raise OSError(f"{path}: not a readable .npy array ({e})") from None
            _check_dtype(path, self._array.dtype)
            kind_layout, channels, height, width = _array_layout(path, self._array.shape, layout, in_chans)
            return ImageInfo(path, height, width, channels, self._array.dtype.name, "npy", layout=kind_layout)
        if suffix in TIFF_SUFFIXES:
            import tifffile  # only TIFF files need it

            with _corrupt_tiff_is_unreadable(path):
                self._tif = tifffile.TiffFile(self._source())
                series = self._tif.series[0]
                shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
            _check_dtype(path, dtype)
            if len(shape) == 2:
                return ImageInfo(path, shape[0], shape[1], 1, dtype.name, "tiff", layout="HW")
            if len(shape) != 3:
                raise ImageFormatError(f"{path}: a TIFF image must have 2 or 3 axes, got shape {shape} (axes {axes})")
            if axes.endswith("S"):
                return ImageInfo(path, shape[0], shape[1], shape[2], dtype.name, "tiff", layout="HWC")
            return ImageInfo(path, shape[1], shape[2], shape[0], dtype.name, "tiff", layout="CHW")
        self.file = open(path, "rb") if self.data is None else io.BytesIO(self.data)
        png = png_header(self.file.read(29)) if suffix == ".png" else None
        self.file.seek(0)
        if png is not None and png[2] == 16:
            width, height, _, color = png
            return ImageInfo(path, height, width, PNG_COLOR_CHANNELS.get(color, 0), "uint16", "png16")
        try:
            self.pil = Image.open(self.file)
        except Image.UnidentifiedImageError:  # name the file, as Image.open(path) does
            raise Image.UnidentifiedImageError(f"cannot identify image file {path!r}") from None
        return pil_info(path, self.pil)

    def read(self, in_chans: int, box: Optional[Tuple[int, int, int, int]] = None) -> np.ndarray:
        """The whole image as stored, or only `box` = (top, left, height, width) of it: a C-contiguous
        (C, H, W) or (C, h, w) array of its own dtype in native byte order (photographs converted per
        in_chans), in memory (never a view of the file)."""
        info = self.info
        if info.kind == "npy":
            stored = self._array  # memory map: slicing reads only the crop
        elif info.kind == "tiff":
            with _corrupt_tiff_is_unreadable(self.path):
                stored = self._tiff_pixels() if box is not None else self._tif.asarray(series=0)
        elif info.kind == "png16":
            self.file.seek(0)
            stored = decode_png16(self.data if self.data is not None else self.file.read())  # (C, H, W) uint16
        else:
            image = self.pil
            mode = pil_target_mode(in_chans) if info.dtype == "uint8" else None
            if mode is not None and image.mode != mode:
                image = image.convert(mode)
            stored = np.asarray(image)
        if stored.ndim == 2:
            stored = stored[None]
        elif info.layout == "HWC" or (info.kind == "pil" and stored.ndim == 3):
            stored = stored.transpose(2, 0, 1)
        if box is not None:
            top, left, height, width = box
            stored = stored[:, top:top + height, left:left + width]
        native = stored.dtype.newbyteorder("=")
        if isinstance(stored, np.memmap):  # (a view of) the file: copy what is needed into memory
            return np.array(stored, dtype=native, order="C")
        return np.ascontiguousarray(stored, dtype=native)

    def read_unit(self, in_chans: int, box: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
        """`read` as a float32 tensor in [0, 1] (integers scaled by their dtype's maximum): only the crop is
        converted when `box` is given."""
        return torch.from_numpy(scale_to_unit(self.read(in_chans, box)))

    def read_pil(self, in_chans: int) -> Image.Image:
        """An 8-bit Pillow image (RGB for in_chans 3, L for 1) for Pillow transforms and pictures.

        8-bit files are decoded by Pillow (photographs converted per in_chans);
        16-bit and float images are scaled by their range first, never clipped to white.
        """
        mode = pil_target_mode(in_chans)
        if mode is None:
            raise ImageFormatError(f"{self.path}: a {in_chans}-channel image has no 8-bit Pillow form")
        if self.info.kind == "pil" and self.info.dtype == "uint8":
            self.pil.load()  # decode now, so truncated files fail here
            return self.pil.convert(mode)
        pixels = (np.clip(scale_to_unit(self.read(in_chans)), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(pixels[0] if in_chans == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))

    def _tiff_pixels(self) -> np.ndarray:
        """The first series as tifffile stores it: memory-mapped when it lies uncompressed in one piece, else
        decoded (all of it)."""
        series, handle = self._tif.series[0], self._tif.filehandle
        offset = series.dataoffset
        if offset is not None and handle.is_file and offset + series.size * series.dtype.itemsize <= handle.size:
            return handle.memmap_array(self._tif.byteorder + series.dtype.char, tuple(series.shape), offset)
        return self._tif.asarray(series=0)

    def close(self) -> None:
        for handle in (self.pil, self.file, self._tif):
            if handle is not None:
                handle.close()
        self._array = None

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def _corrupt_tiff_is_unreadable(path: str):
    """tifffile meets a corrupt file with whatever its parsing runs into (IndexError, ZeroDivisionError,
    TypeError, MemoryError for a header that claims a huge image, ...): make each an OSError naming the
    file, so that training skips it like any unreadable image instead of stopping."""
    try:
        yield
    except UNREADABLE_IMAGE_ERRORS:
        raise
    except Exception as e:  # MemoryError included
        raise OSError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None


def read_info(path: PathLike, layout: str = "auto", in_chans: Optional[int] = None,
              data: Optional[bytes] = None) -> ImageInfo:
    """The header of an image file, or of the image `data` named `path` (nothing is decoded). Raises
    ImageFormatError, OSError."""
    with ImageFile(path, layout, in_chans, data=data) as image:
        return image.info


def pil_info(path: PathLike, image: Image.Image) -> ImageInfo:
    """The ImageInfo of an opened (not necessarily loaded) Pillow image."""
    if image.mode not in PIL_MODE_CHANNELS:
        raise ImageFormatError(f"{path}: unsupported Pillow image mode {image.mode!r}")
    return ImageInfo(str(path), image.height, image.width, PIL_MODE_CHANNELS[image.mode],
                     PIL_MODE_DTYPE.get(image.mode, "uint8"), "pil", mode=image.mode)


def _check_dtype(path: str, dtype: np.dtype) -> None:
    if dtype.kind not in "uifb":
        raise ImageFormatError(f"{path}: samples of dtype {dtype} are not an image (expected integers, floats "
                               f"or booleans)")


def check_compatible(info: ImageInfo, in_chans: int, dtype: str) -> None:
    """Raise ImageFormatError naming the file unless it fits a data set of `in_chans` channels of `dtype`."""
    photo = info.kind == "pil" and info.dtype == "uint8" and dtype == "uint8" and in_chans == 3
    if info.dtype != dtype:
        raise ImageFormatError(f"{info.path} has samples of {info.dtype} ({info.bit_depth}-bit) but the data set's "
                               f"are {dtype}: a folder must not mix bit depths")
    if info.channels != in_chans and not photo:
        raise ImageFormatError(f"{info.path} has {info.channels} channel(s) but the data set has in_chans={in_chans}: "
                               f"a folder must not mix channel counts (set in_chans to match the files)")


def scale_to_unit(array: np.ndarray) -> np.ndarray:
    """float32 copy of `array`, integers divided by their dtype's maximum, booleans as 0/1, floats as they are."""
    if array.dtype.kind in "ui":
        return array.astype(np.float32) * np.float32(1.0 / np.iinfo(array.dtype).max)
    return array.astype(np.float32)


def pil_target_mode(in_chans: int) -> Optional[str]:
    """The Pillow mode 8-bit images are converted to, or None when they are kept as stored."""
    return {1: "L", 3: "RGB"}.get(in_chans)


def check_folder(files, in_chans: int, layout: str = "auto", limit: int = 1000, where: str = "") -> list:
    """Headers of up to `limit` of `files`, spread over the list (first included); all must agree.

    An item of `files` is a path, or a (name, bytes) pair for an image held in memory (a shard's sample).

    Returns the readable ones (unreadable files are left to training to skip and report); raises
    ImageFormatError naming the first file whose channels or bit depth differ from the first readable one.
    """
    picks = np.unique(np.linspace(0, len(files) - 1, min(limit, len(files))).round().astype(int))
    infos = []
    for i in picks:
        try:
            name, data = files[i] if isinstance(files[i], tuple) else (files[i], None)
            infos.append(read_info(name, layout, in_chans, data=data))
        except ImageFormatError:
            raise
        except UNREADABLE_IMAGE_ERRORS:
            continue
    if not infos:
        first = files[0][0] if isinstance(files[0], tuple) else files[0]
        raise ImageFormatError(f"none of the {len(picks)} files checked in {where} is a readable image, "
                               f"e.g. {first}")
    for info in infos:
        try:
            check_compatible(info, in_chans, infos[0].dtype)
        except ImageFormatError as e:
            raise ImageFormatError(f"{e} (first file: {infos[0].path}, {infos[0].describe()})") from None
    return infos
