"""Fine-tuning data: a labelled image folder with train/ and val/, timm's augmentation.

    root/train/<class>/*.jpg      root/val/<class>/*.jpg

Both splits must exist and hold the same classes (checked before any
compute). Training augmentation is timm's: RandomResizedCrop (bicubic),
flip, RandAugment, random erasing; Mixup/CutMix with soft targets and label
smoothing act on batches (`make_mixup`). As in pre-training, the
augmentation of a sample is seeded by (seed, epoch, index), for torch,
python and numpy (timm's RandAugment picks its ops with numpy), so a resumed
run sees the same images and the ranks of a run do not augment in lockstep.
"""

import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import default_loader

from fcmae.data import IMAGENET_MEAN, IMAGENET_STD, DataError, list_images, sample_seed

PathLike = Union[str, os.PathLike]


def class_folders(split_dir: Path) -> List[str]:
    """Sorted names of the non-hidden sub-folders of a split."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_splits(root: PathLike) -> List[str]:
    """The class names of `root`, after checking train/ and val/ exist, are non-empty and agree."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder (expected train/ and val/ in it)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder: fine-tuning needs {root}/train/<class>/... and "
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
    """(image tensor, class index) for every image of root/<class>/, classes in sorted order."""

    def __init__(self, root: PathLike, classes: List[str], transform=None, seed: int = 0):
        self.root = Path(root)
        self.classes = list(classes)
        self.samples: List[Tuple[Path, int]] = [(path, label) for label, name in enumerate(self.classes)
                                                for path in list_images(self.root / name)]
        self.transform = transform
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = default_loader(str(path))
        if self.transform is not None:
            with seeded_rngs(sample_seed(self.seed, self.epoch, index)):
                image = self.transform(image)
        return image, label


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


def _posterize_any_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits kept meaning a black image (Pillow >= 11 refuses bits < 1).

    RandAugment's 'PosterizeIncreasing' at the top magnitude (reached with
    mstd > 0) keeps 0 bits; older Pillow returned a black image for that.
    """
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _patch_timm_posterize() -> None:
    global _timm_posterize
    from timm.data import auto_augment

    if _timm_posterize is None:
        _timm_posterize = auto_augment.posterize
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is _timm_posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits


_timm_posterize = None


def train_transform(cfg):
    from timm.data import create_transform

    _patch_timm_posterize()

    return create_transform(
        cfg["input_size"], is_training=True, auto_augment=cfg["aa"] or None, interpolation="bicubic",
        color_jitter=cfg["color_jitter"], re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=cfg["recount"],
        mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(cfg):
    from timm.data import create_transform

    return create_transform(cfg["input_size"], is_training=False, interpolation="bicubic",
                            crop_pct=cfg["crop_pct"], mean=IMAGENET_MEAN, std=IMAGENET_STD)


def make_mixup(cfg, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing folded into the soft targets), or None when both are off."""
    if cfg["mixup"] <= 0 and cfg["cutmix"] <= 0 and cfg.get("cutmix_minmax") is None:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], cutmix_minmax=cfg.get("cutmix_minmax"),
                 prob=cfg["mixup_prob"], switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                 label_smoothing=cfg["smoothing"], num_classes=num_classes)


def make_criterion(cfg, mixup) -> torch.nn.Module:
    """Soft-target CE with Mixup/CutMix, label-smoothing CE with smoothing, else plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return torch.nn.CrossEntropyLoss()


def demo_root(cfg) -> Path:
    """The labelled demo set (one class per bundled photograph), built once in the cache."""
    from fcmae.demo_data import demo_classification_folder

    return demo_classification_folder(crop_size=cfg["demo_crop_size"], train_per_photo=cfg["demo_train_per_photo"],
                                      val_per_photo=cfg["demo_val_per_photo"])
