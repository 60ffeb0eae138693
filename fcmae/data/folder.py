"""Pre-training data: an image folder, the FCMAE augmentation, a resumable sampler.

- `find_image_root(path)`: `path/train` when it exists, else `path` itself;
  clear errors for a missing path, an empty folder, a folder with no images.
- `ImageFolderDataset`: every image file below the root (class sub-folders
  or flat), labels unused: JPEG/PNG/... photographs, 16-bit PNG, TIFF and
  .npy arrays with 1..N channels (fcmae.data.image_io). An unreadable or
  truncated file, or one whose channels or bit depth differ from the data
  set's, is replaced by the next readable one (so batches keep their size in
  every process) and reported in the batch, so the training loop can log it
  once and stop when too many are bad. A folder that mixes formats is
  caught before training from up to 1,000 headers spread over it.
- Augmentation is seeded per sample by (seed, epoch, index): the same sample
  gets the same crop whatever the number of workers and whether the run was
  resumed, which is what makes a resumed run reproduce its losses.
- `ResumableDistributedSampler`: torch's DistributedSampler that can start
  an epoch part-way through (after a mid-epoch resume).
"""

import math
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from fcmae.data.crops import TensorEvalTransform, array_crop, pil_crop, sample_crop
from fcmae.data.gpu_decode import EncodedBatch, EncodedImage, GpuJpegDecoder, resolve_decode
from fcmae.data.image_io import (
    LAYOUTS,
    UNREADABLE_IMAGE_ERRORS,
    DataError,
    ImageFile,
    ImageFormatError,
    ImageInfo,
    UnreadableImageError,
    check_folder,
    pil_target_mode,
    scale_to_unit,
)
from fcmae.data.stats import (  # noqa: F401 (re-exported: part of this module's API)
    IMAGENET_MEAN,
    IMAGENET_STD,
    channel_stats,
    check_mean_std,
    resolve_mean_std,
)

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".npy")
MAX_IN_CHANS = 1024


def check_in_chans(in_chans) -> int:
    """in_chans as an int in 1..MAX_IN_CHANS, else DataError."""
    if isinstance(in_chans, bool) or not isinstance(in_chans, (int, np.integer)) or not 1 <= in_chans <= MAX_IN_CHANS:
        raise DataError(f"in_chans must be an integer from 1 to {MAX_IN_CHANS}, got {in_chans!r}")
    return int(in_chans)


def find_image_root(data_path: PathLike, split: str = "train") -> Path:
    """`data_path/<split>` when it is a folder, else `data_path`; checked to exist and be non-empty."""
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if not path.is_dir():
        raise DataError(f"data path {path} is not a folder (expected an image folder, optionally with {split}/ inside)")
    root = path / split if (path / split).is_dir() else path
    if not any(root.iterdir()):
        raise DataError(f"data folder {root} is empty")
    return root


def list_images(root: PathLike) -> List[Path]:
    """Image files below `root` (any depth, hidden entries skipped), in sorted order.

    Links to folders are followed, but no folder is visited twice (a link loop such as `self -> .`, or two
    links to one folder, would otherwise list its images again and again).
    """
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return files




def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed for each (seed, epoch, index)."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2 ** 63 - 1)


def unreadable_reason(error: BaseException) -> str:
    """Why a file could not be read, as the reports of bad files give it."""
    return f"{type(error).__name__}: {error}"


def first_readable(index: int, files: Sequence[PathLike], read: Callable[[int], Any], max_retries: int,
                   root: PathLike) -> Tuple[Any, tuple]:
    """(read(i), bad) for the first i of index, index + 1, ... (wrapping) whose file can be read.

    Training's way with unreadable files (pre-training and fine-tuning): the
    sample becomes the next readable file, so batches keep their size in
    every process, and `bad` holds the (path, reason) of the files skipped,
    for `BadImageTracker`. UnreadableImageError after `max_retries` bad
    files in a row.
    """
    bad = []
    for attempt in range(max_retries):
        i = (index + attempt) % len(files)
        try:
            return read(i), tuple(bad)
        except UNREADABLE_IMAGE_ERRORS as e:
            bad.append((str(files[i]), unreadable_reason(e)))
    raise UnreadableImageError(f"{max_retries} unreadable images in a row from {files[index]}; "
                               f"the data set at {root} looks broken")


class PretrainCrops:
    """The pre-training augmentation of one image, shared by the folder and the shards (fcmae.data.shards).

    Expects the attributes `input_size`, `crop_scale`, `crop_ratio`, `seed`, `epoch`, `in_chans`, `decode`,
    `mean`, `std`, `_affine` (None) and `_decoders` ({}).
    """

    def fixed_batch(self, count: int, source=None) -> Optional[torch.Tensor]:
        """`count` images spread over the set (or over `source`: `load_unit(i)` and len), shorter side resized
        to input_size, centre-cropped, normalised.

        For the reconstruction picture; unreadable files are left out (None when none is readable).
        """
        source = self if source is None else source
        transform = TensorEvalTransform(self.input_size, 1.0, self.mean, self.std)
        images = []
        for i in np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int):
            try:
                unit = source.load_unit(int(i))
            except UNREADABLE_IMAGE_ERRORS:
                continue
            images.append(transform(unit))
        return torch.stack(images) if images else None

    # ------------------------------------------------------------ training items
    def normalise(self, unit: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
        """(C, H, W) values in [0, max_value] -> (x / max_value - mean) / std per channel, as float32."""
        if self._affine is None or self._affine[0] != max_value:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            self._affine = (max_value, 1.0 / (max_value * std), mean / std)
        _, scale, shift = self._affine
        return unit.float().mul_(scale).sub_(shift) if unit.dtype != torch.float32 else unit * scale - shift

    def sample_crop(self, height: int, width: int, index: int) -> Tuple[Tuple[int, int, int, int], bool]:
        """The crop box (top, left, h, w) and flip of sample `index` this epoch, for an image of this size."""
        with torch.random.fork_rng(devices=[]):
            # CPU generator only: torch.manual_seed would also queue CUDA seeding (slow, and not needed here)
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return sample_crop(height, width, self.crop_scale, self.crop_ratio)

    def crop_image(self, image: ImageFile, index: int):
        """`crop_item` of an open image (a file, or a shard's sample held in memory: fcmae.data.shards)."""
        info = image.info
        box, flip = self.sample_crop(info.height, info.width, index)
        if image.pil is not None:
            return self._crop_pillow(image.pil, image.file, info, box, flip)
        crop = image.read_unit(self.in_chans, box)  # only the crop is read (arrays) and converted
        _, _, h, w = box
        return self._finish(array_crop(crop, (0, 0, h, w), self.input_size), flip)

    def _crop_pillow(self, image: Image.Image, f, info: ImageInfo, box: Tuple[int, int, int, int], flip: bool):
        size = self.input_size
        if self.decode == "gpu" and image.format == "JPEG" and image.mode in ("RGB", "L"):
            f.seek(0)
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            return EncodedImage(data, torch.tensor([*box, int(flip)]))
        if info.dtype == "uint8" and pil_target_mode(self.in_chans) is not None:
            crop = pil_crop(image, box, size, self.in_chans)
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop
            pixels = np.asarray(crop).reshape(size, size, -1)
            # np.array copies: Pillow's array is read-only, and a one-channel transpose is a view of it
            pixels = torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))
            return pixels if self.decode == "gpu" else self.normalise(pixels, 255.0)
        stored = np.asarray(image)  # as stored (RGBA: Pillow's resize would premultiply alpha)
        stored = stored if stored.ndim == 3 else stored[..., None]
        top, left, h, w = box
        unit = torch.from_numpy(scale_to_unit(stored[top:top + h, left:left + w]).transpose(2, 0, 1))
        return self._finish(array_crop(unit, (0, 0, h, w), size), flip)

    def _finish(self, unit: torch.Tensor, flip: bool) -> torch.Tensor:
        """A cropped (C, S, S) image in 0..1 -> the normalised sample, or for decode='gpu' the uint8 crop
        `to_device` finishes (decode='gpu' runs on 8-bit data sets only, so 255 steps lose nothing)."""
        unit = unit.flip(-1) if flip else unit
        if self.decode == "gpu":
            return unit.mul(255.0).clamp_(0, 255).round_().to(torch.uint8)
        return self.normalise(unit)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_decoders"] = {}  # CUDA tensors never travel to loader workers
        return state

    def to_device(self, images, device) -> torch.Tensor:
        """A collated batch of images as a normalised float tensor on `device` (GPU-decoding it when encoded)."""
        if torch.is_tensor(images):
            return images.to(device, non_blocking=True)

        key = str(device)
        if key not in self._decoders:
            self._decoders[key] = GpuJpegDecoder(self.input_size, self.mean, self.std, device)
        return self._decoders[key](images)




class ImageFolderDataset(PretrainCrops, Dataset):
    """All images below `root`; item i is (image tensor, tuple of (path, reason) of bad files met).

    Two ways to use it:
    - `input_size` given (the pre-training pipeline): RandomResizedCrop
      (bicubic, `crop_scale`, ratio 3/4..4/3) + horizontal flip +
      normalisation, for any supported file kind (fcmae.data.image_io), with
      reduced-size JPEG decoding; the crop box and the flip are drawn
      exactly as torchvision's RandomResizedCrop.get_params and
      RandomHorizontalFlip draw them, on the full image's size.
      With `decode='gpu'` JPEGs are not decoded here: the item is an
      `EncodedImage` and `to_device` decodes the batch on the GPU
      (fcmae.data.gpu_decode).
    - `transform` given: `transform(self.load(i))` on 8-bit Pillow images.

    The data set's format, carried for the model and the checkpoint:
    `in_chans`, `dtype` (of the stored samples, e.g. 'uint8', 'uint16'),
    `bit_depth`, `mean`, `std` (per channel, on the [0, 1] scale) and
    `decode` ('cpu' or 'gpu'). mean/std: a sequence of in_chans values,
    'auto' (computed from up to 1,000 sampled images, `channel_stats`) or
    None (ImageNet's for 3-channel 8-bit data, else 'auto').
    """

    def __init__(self, root: PathLike, transform=None, seed: int = 0, max_retries: int = 20, *,
                 input_size: Optional[int] = None, crop_scale: Sequence[float] = (0.2, 1.0), in_chans: int = 3,
                 mean=None, std=None, decode: str = "cpu", layout: str = "auto", cuda: Optional[bool] = None,
                 check_files: int = 1000, logger=print):
        self.root = Path(root)
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(
                f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in sub-folders too)"
            )
        if transform is not None and input_size is not None:
            raise ValueError("give either transform or input_size, not both")
        self.transform, self.input_size = transform, input_size
        self.crop_scale, self.crop_ratio = tuple(crop_scale), (3.0 / 4.0, 4.0 / 3.0)
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries
        self.in_chans, self.layout = check_in_chans(in_chans), layout
        if layout not in LAYOUTS:
            raise DataError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        infos = self._check_format(check_files)
        self.dtype = infos[0].dtype
        self.bit_depth = infos[0].bit_depth
        self.decode = resolve_decode(decode, infos, self.in_chans, self.dtype, cuda)
        if transform is not None and mean is None and std is None:
            self.mean = self.std = None  # the transform normalises
        else:
            self.mean, self.std = resolve_mean_std(mean, std, self, logger=logger)
        self._decoders = {}
        self._affine = None

    # ------------------------------------------------------------ format
    def _check_format(self, limit: int) -> List[ImageInfo]:
        try:
            return check_folder(self.files, self.in_chans, self.layout, limit, str(self.root))
        except ImageFormatError as e:
            raise DataError(str(e)) from None

    def open(self, index: int) -> ImageFile:
        """File `index`, opened once (a context manager), its header checked against the data set's format
        (ImageFormatError names the file)."""
        return ImageFile(self.files[index], self.layout, self.in_chans, self.dtype)

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations depend on the epoch; set it before creating the epoch's DataLoader iterator."""
        self.epoch = epoch

    # ------------------------------------------------------------ whole images
    def load_unit(self, index: int) -> torch.Tensor:
        """File `index` as a float32 (in_chans, H, W) tensor in [0, 1] (integers scaled by their dtype's maximum)."""
        with self.open(index) as image:
            return image.read_unit(self.in_chans)

    def load(self, index: int) -> Image.Image:
        """File `index` as an 8-bit Pillow image (RGB or L), for Pillow transforms and pictures.

        16-bit and float images are scaled by their range (never clipped to white); only 1- and 3-channel
        data sets have a Pillow form.
        """
        with self.open(index) as image:
            return image.read_pil(self.in_chans)

    def crop_item(self, file_index: int, index: int):
        """The augmented sample `index` from file `file_index`: a normalised tensor or, for decode='gpu', an
        `EncodedImage` (JPEG bytes + box) or uint8 crop that `to_device` finishes."""
        with self.open(file_index) as image:
            return self.crop_image(image, index)

    def __getitem__(self, index: int):
        if self.input_size is not None:
            return first_readable(index, self.files, lambda i: self.crop_item(i, index), self.max_retries, self.root)
        image, bad = first_readable(index, self.files, self.load, self.max_retries, self.root)
        if self.transform is not None:
            # Seed the augmentation by (seed, epoch, index) without touching the caller's RNG.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
                image = self.transform(image)
        return image, bad

def collate_images(batch: Sequence[Tuple[Any, tuple]]):
    """Stack the images (or gather encoded ones); concatenate the (path, reason) of bad files met while loading.

    Items that are neither tensors nor encoded images (fine-tuning's (image, label) pairs) are collated as
    torch's DataLoader collates them by default.
    """
    items = [item[0] for item in batch]
    if all(torch.is_tensor(x) for x in items):
        images = torch.stack(items)
    elif all(torch.is_tensor(x) or isinstance(x, EncodedImage) for x in items):  # decode='gpu': JPEGs encoded
        images = EncodedBatch.collate(items)
    else:
        images = default_collate(items)
    bad = [b for item in batch for b in item[1]]
    return images, bad



class BadImageTracker:
    """Counts unreadable files (each logged once) and stops when more than a fraction is bad.

    An entry of `bad` is (path, reason), or (path, reason, count) for one that stands for `count` samples
    (a shard cut short: fcmae.data.shard_stream).
    """

    def __init__(self, dataset_size: int, max_fraction: float, logger=print):
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.logger = logger
        self.seen = {}  # path -> (reason, samples lost)

    @property
    def limit(self) -> int:
        return int(math.floor(self.max_fraction * self.dataset_size))

    @property
    def lost(self) -> int:
        """The samples lost so far."""
        return sum(count for _, count in self.seen.values())

    def report(self, bad: Sequence[tuple], fail: Callable[[Exception], None]) -> None:
        """`update`, but too many bad files go to `fail` (Trainer.fail_at_next_check) instead of raising:
        this rank alone may see them, so every rank stops together at the next check."""
        if bad:
            try:
                self.update(bad)
            except DataError as e:
                fail(e)

    def update(self, bad: Sequence[tuple]) -> None:
        for path, reason, *count in bad:
            if path not in self.seen:
                self.seen[path] = (reason, count[0] if count else 1)
                self.logger(f"skipping unreadable image {path} ({reason}); {self.lost} bad so far")
        if self.lost > self.limit:
            raise DataError(
                f"{self.lost} of {self.dataset_size} images are unreadable, more than the allowed "
                f"{self.max_fraction:.1%} (max_bad_fraction); fix or remove them, e.g. {next(iter(self.seen))}"
            )
