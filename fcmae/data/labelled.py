"""Labelled image folders, for every command that needs classes: fine-tuning, kNN, the linear probe.

    root/train/<class>/*.jpg      root/val/<class>/*.jpg

Both splits must exist and hold the same classes (`check_splits`, before any
compute). `LabelledFolder` reads a split as pre-training reads its folder
(fcmae.data.image_io: 8-bit photographs through Pillow; 16-bit PNG, TIFF,
.npy and 1..N channels as float tensors in [0, 1]) and seeds each sample's
augmentation by (seed, epoch, index) for torch, python and numpy
(`seeded_rngs`), so a resumed run sees the same images and the ranks of a
run do not augment in lockstep.

Transforms: `eval_transform` is timm's resize + centre crop for photographs,
or the same on tensors for domain images. For domain images,
`TensorTrainTransform` is the training augmentation (RandomResizedCrop,
flip, normalisation, random erasing); it reads only its crop of each file.
Fine-tuning's timm augmentation and Mixup live in finetune.data.

Unreadable files: the training set (`skip_unreadable=True`) replaces one by
the next readable file with that file's label, and reports it as
pre-training does (fcmae.data.folder.first_readable; items are
((image, label), bad)). Evaluation sets never substitute a file (that would
bias the accuracy): an unreadable one is an UnreadableImageError naming it.
"""

import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, List, Tuple, Union

import numpy as np
import torch
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset, Sampler

from fcmae.data.crops import TensorEvalTransform, array_crop, sample_crop
from fcmae.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    check_in_chans,
    first_readable,
    list_images,
    sample_seed,
    unreadable_reason,
)
from fcmae.data.image_io import UNREADABLE_IMAGE_ERRORS, ImageFile, ImageFormatError, UnreadableImageError, check_folder

PathLike = Union[str, os.PathLike]


def class_folders(split_dir: Path) -> List[str]:
    """Sorted names of the non-hidden sub-folders of a split."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_splits(root: PathLike, purpose: str = "fine-tuning") -> List[str]:
    """The class names of `root`, after checking train/ and val/ exist, are non-empty and agree.

    `purpose` names what reads the folder, in the message of a missing split ("fcmae-knn needs ...").
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder (expected train/ and val/ in it)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder: {purpose} needs {root}/train/<class>/... and "
                            f"{root}/val/<class>/...")
    train, val = class_folders(root / "train"), class_folders(root / "val")
    if not train:
        raise DataError(f"{root / 'train'} has no class sub-folders")
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise DataError(f"the classes of train/ and val/ differ in {root}: only in train/: "
                        f"{', '.join(only_train) or 'none'}; only in val/: {', '.join(only_val) or 'none'}")
    for split in ("train", "val"):
        empty = [c for c in train if not list_images(root / split / c)]
        if empty:
            raise DataError(f"class folder(s) without images in {root / split}: {', '.join(empty[:5])}")
    return train


class LabelledFolder(Dataset):
    """(image tensor, class index) for every image of root/<class>/, classes in sorted order.

    Carries the data's format: `in_chans`, `dtype`, `bit_depth`, and `uses_pil` (True: 8-bit RGB data,
    given to `transform` as a Pillow image; False: a float (C, H, W) tensor in [0, 1]).

    With `skip_unreadable` (the training set) item i is ((image, class index), bad): an unreadable file is
    replaced by the next readable one (up to `max_retries` in a row) and bad holds the (path, reason) of the
    files skipped (see the module docstring); without it an unreadable file is an UnreadableImageError.
    """

    def __init__(self, root: PathLike, classes: List[str], transform=None, seed: int = 0, *, in_chans: int = 3,
                 layout: str = "auto", check_files: int = 1000, skip_unreadable: bool = False,
                 max_retries: int = 20):
        self.root = Path(root)
        self.classes = list(classes)
        self.samples: List[Tuple[Path, int]] = [(path, label) for label, name in enumerate(self.classes)
                                                for path in list_images(self.root / name)]
        self.files = [path for path, _ in self.samples]
        self.transform = transform
        self.seed, self.epoch = seed, 0
        self.skip_unreadable, self.max_retries = skip_unreadable, max_retries
        self.in_chans, self.layout = check_in_chans(in_chans), layout
        if self.samples:
            try:
                infos = check_folder(self.files, self.in_chans, layout, check_files, str(self.root))
            except ImageFormatError as e:
                raise DataError(str(e)) from None
            self.dtype = infos[0].dtype
        else:
            self.dtype = "uint8"
        self.bit_depth = 8 * torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        self.uses_pil = self.dtype == "uint8" and self.in_chans == 3

    def open(self, index: int) -> ImageFile:
        """Image `index`, opened once (a context manager), its header checked against the data's format."""
        return ImageFile(self.samples[index][0], self.layout, self.in_chans, self.dtype)

    def load_unit(self, index: int) -> torch.Tensor:
        """Image `index` as a float32 (in_chans, H, W) tensor in [0, 1] (for channel statistics)."""
        with self.open(index) as image:
            return image.read_unit(self.in_chans)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        seed = sample_seed(self.seed, self.epoch, index)  # the sample's, whichever file stands in for it

        def read(i: int) -> Tuple[Any, int]:
            return self._read(i, seed), self.samples[i][1]

        if self.skip_unreadable:
            (image, label), bad = first_readable(index, self.files, read, self.max_retries, self.root)
            return (self._transform(image, seed), label), bad
        try:
            image, label = read(index)
        except UNREADABLE_IMAGE_ERRORS as e:
            raise UnreadableImageError(
                f"unreadable image {self.samples[index][0]} ({unreadable_reason(e)}); evaluation does not skip "
                "files (another image in its place would bias the accuracy): fix or remove it") from None
        return self._transform(image, seed), label

    def _read(self, index: int, seed: int):
        """File `index` as a Pillow image or a float tensor, or already transformed (`Transformed`) by a tensor
        training transform, which reads and converts only its crop. One open per sample."""
        with self.open(index) as file:
            if self.uses_pil:
                return file.read_pil(self.in_chans)
            if isinstance(self.transform, TensorTrainTransform):
                with seeded_rngs(seed):
                    return Transformed(self.transform.from_file(file, self.in_chans))
            return file.read_unit(self.in_chans)

    def _transform(self, image, seed: int):
        if isinstance(image, Transformed):
            return image.tensor
        if self.transform is None:
            return image
        with seeded_rngs(seed):
            return self.transform(image)


class Transformed:
    """A sample that its transform already made (while its file was open)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


@contextmanager
def seeded_rngs(seed: int):
    """Seed torch's, python's and numpy's global RNGs for the block, then put their states back.

    timm's augmentations draw from all three (RandAugment picks its ops with numpy).
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # all 63 bits, not just the low 32
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class ShardSampler(Sampler):
    """Every `world`-th index from `rank`, in order, without padding: each sample is evaluated exactly once."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_transform(cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD, pil: bool = True):
    """timm's evaluation transform (pil) or resize + centre crop + normalise on tensors."""
    if not pil:
        return TensorEvalTransform(cfg["input_size"], cfg["crop_pct"], mean, std)
    return create_transform(cfg["input_size"], is_training=False, interpolation="bicubic",
                            crop_pct=cfg["crop_pct"], mean=mean, std=std)


class TensorTrainTransform:
    """(C, H, W) float in [0, 1] -> RandomResizedCrop (0.08..1, bicubic) + flip + normalise + random erasing."""

    def __init__(self, input_size: int, mean, std, reprob: float = 0.0, remode: str = "pixel", recount: int = 1,
                 scale=(0.08, 1.0)):
        self.size, self.scale = int(input_size), tuple(scale)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.erase = None
        if reprob > 0:
            self.erase = RandomErasing(reprob, mode=remode, max_count=recount, device="cpu")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        box, flip = sample_crop(image.shape[-2], image.shape[-1], self.scale)
        return self._finish(array_crop(image, box, self.size), flip)

    def from_file(self, image: ImageFile, in_chans: int) -> torch.Tensor:
        """The same as `self(whole image)` for an open image file, reading and converting only the crop."""
        box, flip = sample_crop(image.info.height, image.info.width, self.scale)
        crop = image.read_unit(in_chans, box)
        return self._finish(array_crop(crop, (0, 0, box[2], box[3]), self.size), flip)

    def _finish(self, x: torch.Tensor, flip: bool) -> torch.Tensor:
        x = (x.flip(-1) if flip else x) - self.mean
        x = x / self.std
        return self.erase(x) if self.erase is not None else x
