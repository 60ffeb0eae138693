"""Fine-tuning's augmentation and loss: timm's training transform, Mixup/CutMix, the criterion, the demo set.

The labelled folders themselves (train/ and val/ with one sub-folder per
class, 16-bit and multi-channel images, unreadable files) are read by
fcmae.data.labelled. Training augmentation for photographs is timm's:
RandomResizedCrop (bicubic), flip, RandAugment, random erasing; domain
images get fcmae.data.labelled.TensorTrainTransform (no RandAugment or
colour jitter, which are defined for 8-bit RGB). Mixup/CutMix with soft
targets and label smoothing act on batches (`make_mixup`) and work for both.
"""

from pathlib import Path

import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from fcmae.data.demo import demo_classification_folder
from fcmae.data.folder import IMAGENET_MEAN, IMAGENET_STD
from fcmae.data.labelled import TensorTrainTransform


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
