"""Fine-tuning's augmentation and loss: timm's training transform, Mixup/CutMix, the criterion, the demo set.

The labelled folders themselves (train/ and val/ with one sub-folder per
class, 16-bit and multi-channel images, unreadable files) are read by
fcmae.data.labelled, labelled shards by fcmae.data.labelled_splits and
fcmae.data.shard_sets. Training augmentation for photographs is timm's:
RandomResizedCrop (bicubic), flip, RandAugment, random erasing; domain
images get fcmae.data.labelled.TensorTrainTransform (no RandAugment or
colour jitter, which are defined for 8-bit RGB). Mixup/CutMix with soft
targets and label smoothing act on batches (`make_mixup`) and work for both.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader

from fcmae.data import labelled
from fcmae.data.demo import demo_classification_folder
from fcmae.data.folder import IMAGENET_MEAN, IMAGENET_STD, DataError
from fcmae.data.labelled import TensorTrainTransform
from fcmae.data.labelled_splits import (
    LabelledData,
    ShardSplits,
    eval_loader,
    eval_set,
    find_labelled_data,
    split_name,
)
from fcmae.data.shard_sets import LabelledShards, ProbeSet
from fcmae.data.shards import epoch_samples
from fcmae.data.stats import resolve_mean_std, saved_mean_std
from fcmae.runtime import distributed
from fcmae.runtime.errors import UsageError
from fcmae.runtime.logs import log
from finetune.config import FinetuneConfig


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
    if _timm_posterize is None:
        _timm_posterize = auto_augment.posterize
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is _timm_posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits


_timm_posterize = None


def train_transform(cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD, pil: bool = True):
    """timm's training transform (pil) or the tensor one for domain images (see the module docstring)."""
    if not pil:
        return TensorTrainTransform(cfg["input_size"], mean, std, reprob=cfg["reprob"], remode=cfg["remode"],
                                    recount=cfg["recount"])
    _patch_timm_posterize()
    return create_transform(
        cfg["input_size"], is_training=True, auto_augment=cfg["aa"] or None, interpolation="bicubic",
        color_jitter=cfg["color_jitter"], re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=cfg["recount"],
        mean=mean, std=std)


def make_mixup(cfg, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing folded into the soft targets), or None when both are off."""
    if cfg["mixup"] <= 0 and cfg["cutmix"] <= 0 and cfg.get("cutmix_minmax") is None:
        return None
    return Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], cutmix_minmax=cfg.get("cutmix_minmax"),
                 prob=cfg["mixup_prob"], switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                 label_smoothing=cfg["smoothing"], num_classes=num_classes)


def make_criterion(cfg, mixup) -> torch.nn.Module:
    """Soft-target CE with Mixup/CutMix, label-smoothing CE with smoothing, else plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return torch.nn.CrossEntropyLoss()


def demo_root(cfg) -> Path:
    """The labelled demo set (one class per bundled photograph), built once in the cache."""
    return demo_classification_folder(crop_size=cfg["demo_crop_size"], train_per_photo=cfg["demo_train_per_photo"],
                                      val_per_photo=cfg["demo_val_per_photo"])


# ---------------------------------------------------------------- the run's folders and sets
def data_root(cfg: FinetuneConfig, build: bool = True) -> Path:
    if cfg.data_path:
        return Path(cfg.data_path).expanduser()
    if not build:
        return Path("<built-in labelled demo photographs>")
    return demo_root(cfg.to_dict())


def prepare_splits(cfg: FinetuneConfig, info: distributed.DistInfo) -> Tuple[LabelledData, List[str]]:
    """(folder or shards, classes): the demo set is built by rank 0 first; a folder's train/ and val/ checked to
    agree, or labelled shards found (fcmae.data.labelled_splits: classes from their _info.json or num_classes)."""
    root = data_root(cfg) if info.is_main else None
    distributed.barrier()
    root = root or data_root(cfg)
    data, classes = find_labelled_data(cfg.data_path or root, num_classes=cfg.num_classes)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise UsageError(f"num_classes is {cfg.num_classes} but the data set at {root} has {len(classes)} "
                         f"classes (folders in train/); drop --num_classes / --nb_classes or fix the data")
    return data, classes


def normalisation(cfg: FinetuneConfig, train, resumed: Optional[Dict[str, Any]] = None,
                  pretrained: Optional[Dict[str, Any]] = None):
    """(mean, std) of the run: the config's lists; else the resolved values stored in the config of the
    fine-tuning checkpoint resumed or evaluated (for null or auto) or of the pre-training checkpoint (for null); else
    `resolve_mean_std` on the training set (null: ImageNet's for 3-channel 8-bit data; auto: computed)."""
    mean, std = cfg.mean, cfg.std
    for config, what, reusable in ((resumed, "the fine-tuning checkpoint", (None, "auto")),
                                   (pretrained, f"the pre-training checkpoint {cfg.finetune}", (None,))):
        stored = saved_mean_std(config, cfg.in_chans)
        if stored is not None and (mean in reusable or std in reusable):
            mean, std = (stored[0] if mean in reusable else mean), (stored[1] if std in reusable else std)
            log(f"normalisation from {what}")
            break
        if stored is not None and isinstance(mean, tuple) and isinstance(std, tuple) and (mean, std) != stored:
            log(f"note: mean {list(mean)}, std {list(std)} as given, mean {list(stored[0])}, std "
                f"{list(stored[1])} in {what}; using the given values")
            break
    return resolve_mean_std(mean, std, train, logger=log)


def training_set(cfg: FinetuneConfig, data: LabelledData, classes: List[str]):
    """The training split: a LabelledFolder that skips unreadable files, or a LabelledShards stream whose epoch
    holds --train_num_samples or _info.json's count."""
    if isinstance(data, ShardSplits):
        return LabelledShards(data.train, epoch_samples(cfg.train_num_samples, data.train, log), len(classes),
                              in_chans=cfg.in_chans, layout=cfg.layout, seed=cfg.seed, buffer=cfg.shuffle_buffer)
    return labelled.LabelledFolder(data / "train", classes, seed=cfg.seed, in_chans=cfg.in_chans, layout=cfg.layout,
                                   skip_unreadable=True)


def prepare_data(cfg: FinetuneConfig, data: LabelledData, classes: List[str],
                 resumed: Optional[Dict[str, Any]] = None, pretrained: Optional[Dict[str, Any]] = None,
                 evaluating: bool = False):
    """(cfg with the resolved mean/std, train set, val set), formats checked, transforms set (see `normalisation`).

    On shards the format and any computed statistics come from the training split's probe (its first samples
    of a few shards); `evaluating` (--eval) reads only that, not a training stream (train set None).
    """
    if evaluating and isinstance(data, ShardSplits):
        train, reference = None, ProbeSet(data.train, cfg.in_chans, cfg.layout)
    else:
        train = training_set(cfg, data, classes)
        reference = train.probe if isinstance(train, LabelledShards) else train
    val = eval_set(data, "val", classes, in_chans=cfg.in_chans, layout=cfg.layout)
    if val.dtype != reference.dtype:
        raise DataError(f"{split_name(data, 'train')} holds {reference.bit_depth}-bit images ({reference.dtype}) but "
                        f"{split_name(data, 'val')} holds {val.bit_depth}-bit ones ({val.dtype}): both splits need "
                        "the same kind of image")
    mean, std = normalisation(cfg, reference, resumed, pretrained)
    cfg = cfg.replace(mean=mean, std=std)  # resolved: saved in config.yaml and the checkpoints
    settings = cfg.to_dict()
    if train is not None:
        log(f"data: {len(train)} training images of {cfg.in_chans} channel(s) of {train.dtype}; normalisation mean "
            f"{list(mean)}, std {list(std)}")
        train.transform = train_transform(settings, mean, std, pil=train.uses_pil)
    val.transform = labelled.eval_transform(settings, mean, std, pil=val.uses_pil)
    return cfg, train, val


def val_loader(cfg: FinetuneConfig, val, info: distributed.DistInfo) -> DataLoader:
    """This rank's part of the validation set (every image once over the ranks: fcmae.data.labelled_splits)."""
    return eval_loader(val, cfg.batch_size, cfg.num_workers, info.rank, info.world_size,
                       pin=info.device.type == "cuda")
