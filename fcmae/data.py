"""Pre-training data: an image folder, the FCMAE augmentation, a resumable sampler.

- `find_image_root(path)`: `path/train` when it exists, else `path` itself;
  clear errors for a missing path, an empty folder, a folder with no images.
- `ImageFolderDataset`: every image file below the root (class sub-folders
  or flat), labels unused. An unreadable or truncated file is replaced by the
  next readable one (so batches keep their size in every process) and
  reported in the batch, so the training loop can log it once and stop when
  too many are bad.
- Augmentation is seeded per sample by (seed, epoch, index): the same sample
  gets the same crop whatever the number of workers and whether the run was
  resumed, which is what makes a resumed run reproduce its losses.
- `ResumableDistributedSampler`: torch's DistributedSampler that can start
  an epoch part-way through (after a mid-epoch resume).
"""

import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision import transforms

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Unusable training data; the message says what is wrong and where."""


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


def pretrain_transform(input_size: int, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RandomResizedCrop (bicubic) + horizontal flip + normalisation: the FCMAE recipe."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=tuple(scale),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed for each (seed, epoch, index)."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2 ** 63 - 1)


class ImageFolderDataset(Dataset):
    """All images below `root`; item i is (augmented image tensor, tuple of bad paths met)."""

    def __init__(self, root: PathLike, transform=None, seed: int = 0, max_retries: int = 20):
        self.root = Path(root)
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(
                f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in sub-folders too)"
            )
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations depend on the epoch; set it before creating the epoch's DataLoader iterator."""
        self.epoch = epoch

    def load(self, index: int) -> Image.Image:
        with open(self.files[index], "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, so truncated files fail here
            return image.convert("RGB")

    def __getitem__(self, index: int):
        bad = []
        for attempt in range(self.max_retries):
            i = (index + attempt) % len(self.files)
            try:
                image = self.load(i)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                bad.append((str(self.files[i]), f"{type(e).__name__}: {e}"))
        else:
            raise DataError(f"{self.max_retries} unreadable images in a row from {self.files[index]}; "
                            f"the data set at {self.root} looks broken")
        if self.transform is not None:
            # Seed the augmentation by (seed, epoch, index) without touching the caller's RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, index))
                image = self.transform(image)
        return image, tuple(bad)


def collate_images(batch: Sequence[Tuple[torch.Tensor, tuple]]):
    """Stack the images; concatenate the (path, reason) of bad files met while loading."""
    images = torch.stack([item[0] for item in batch])
    bad = [b for item in batch for b in item[1]]
    return images, bad


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after `start_batch` batches of `batch_size`."""

    def __init__(self, dataset, batch_size: int, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start_batch = 0
        self.max_batches: Optional[int] = None  # cap on batches per epoch (e.g. a multiple of update_freq)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        full = self.num_samples // self.batch_size
        return full if self.max_batches is None else min(full, self.max_batches)

    def __iter__(self):
        indices = list(super().__iter__())
        usable = self.batches_per_epoch() * self.batch_size
        return iter(indices[self.start_batch * self.batch_size:usable])

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0) * self.batch_size


class BadImageTracker:
    """Counts unreadable files (each logged once) and stops when more than a fraction is bad."""

    def __init__(self, dataset_size: int, max_fraction: float, logger=print):
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.logger = logger
        self.seen = {}

    @property
    def limit(self) -> int:
        return int(math.floor(self.max_fraction * self.dataset_size))

    def update(self, bad: Sequence[Tuple[str, str]]) -> None:
        for path, reason in bad:
            if path not in self.seen:
                self.seen[path] = reason
                self.logger(f"skipping unreadable image {path} ({reason}); {len(self.seen)} bad so far")
        if len(self.seen) > self.limit:
            raise DataError(
                f"{len(self.seen)} of {self.dataset_size} images are unreadable, more than the allowed "
                f"{self.max_fraction:.1%} (max_bad_fraction); fix or remove them, e.g. {next(iter(self.seen))}"
            )
