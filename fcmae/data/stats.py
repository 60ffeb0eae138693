"""Per-channel normalisation of a data set: given in the config, ImageNet's, or computed ('auto').

`channel_stats` reads up to 1,000 images picked by a seeded draw (the same
files every time for the same folder), scales them to [0, 1] as training
does (integers by their dtype's maximum) and returns each channel's mean
and standard deviation over all their pixels. The command that calls it
prints the values and stores them in the config and the checkpoint, so a
resumed run and fine-tuning reuse them instead of computing them again.

The config keys `mean` and `std` of both commands are read by
`parse_mean_std` and checked against `in_chans` by `check_mean_std_setting`
(one-line errors before any data is read); `saved_mean_std` finds the
resolved values in a run's stored config.
"""

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fcmae.data.image_io import UNREADABLE_IMAGE_ERRORS, DataError
from fcmae.runtime.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_IMAGES = 1000

# A mean/std setting: None (ImageNet's for 3-channel 8-bit data, else 'auto'), 'auto', or one value per channel.
MeanStd = Optional[Union[str, Tuple[float, ...]]]


def channel_stats(dataset, max_images: int = STATS_IMAGES, seed: int = 0,
                  logger: Optional[Callable[[str], None]] = print) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) per channel over up to `max_images` images of `dataset` (anything with `load_unit(i)` and len).

    Args:
        dataset: e.g. fcmae.data.folder.ImageFolderDataset; `load_unit(i)` gives a (C, H, W) float tensor in [0, 1].
        max_images: how many images to read at most (all of them when the set is smaller).
        seed: the draw of images; the same seed picks the same files.
        logger: progress and the result go here (None: silent).
    """
    count = min(max_images, len(dataset))
    picks = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    total = total_sq = None
    pixels, used = 0, 0
    for n, i in enumerate(picks):
        try:
            unit = dataset.load_unit(int(i)).double()
        except UNREADABLE_IMAGE_ERRORS:
            continue  # unreadable files are reported by training; the statistics skip them
        flat = unit.reshape(unit.shape[0], -1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = (flat * flat).sum(1) if total_sq is None else total_sq + (flat * flat).sum(1)
        pixels += flat.shape[1]
        used += 1
        if logger is not None and (n + 1) % 200 == 0:
            logger(f"channel statistics: {n + 1}/{count} images read")
    if not used:
        raise DataError(f"none of the {count} images sampled for the channel statistics could be read")
    mean = total / pixels
    var = (total_sq / pixels - mean * mean).clamp_min(0)
    mean_t = tuple(round(float(m), 6) for m in mean)
    std_t = tuple(round(max(math.sqrt(float(v)), 1e-6), 6) for v in var)
    if logger is not None:
        logger(f"channel statistics from {used} images: mean {list(mean_t)}, std {list(std_t)}")
    return mean_t, std_t


def check_mean_std(mean: Sequence[float], std: Sequence[float], in_chans: int) -> Tuple[Tuple[float, ...], ...]:
    """mean and std as tuples of in_chans floats (std > 0), else DataError saying which is wrong."""
    out = []
    for name, values in (("mean", mean), ("std", std)):
        try:
            values = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise DataError(f"{name} must be a list of {in_chans} numbers (one per channel) or 'auto', "
                            f"got {values!r}") from None
        if len(values) != in_chans:
            raise DataError(f"{name} has {len(values)} value(s) but the data has in_chans={in_chans} channel(s): "
                            f"give one per channel, or 'auto'")
        if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
            raise DataError(f"{name} values must be finite{' and positive' if name == 'std' else ''}, "
                            f"got {list(values)}")
        out.append(values)
    return tuple(out)


def resolve_mean_std(mean, std, dataset,
                     logger: Optional[Callable[[str], None]] = print) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation of `dataset` (which has in_chans, dtype, load_unit).

    mean/std: sequences of in_chans values; 'auto' (both, or either: computed,
    `channel_stats`); None (both: ImageNet's for 3-channel 8-bit data, else 'auto').
    """
    in_chans = dataset.in_chans
    if mean is None and std is None:
        if in_chans == 3 and dataset.dtype == "uint8":
            return IMAGENET_MEAN, IMAGENET_STD
        mean = std = "auto"
    if mean is None or std is None:
        raise DataError("give both mean and std (or neither, or 'auto')")
    if isinstance(mean, str) or isinstance(std, str):
        for name, value in (("mean", mean), ("std", std)):
            if isinstance(value, str) and value != "auto":
                raise DataError(f"{name} must be 'auto' or a list of {in_chans} numbers, got {value!r}")
        auto_mean, auto_std = channel_stats(dataset, logger=logger)
        mean = auto_mean if isinstance(mean, str) else mean
        std = auto_std if isinstance(std, str) else std
    return check_mean_std(mean, std, in_chans)


# ---------------------------------------------------------------- the config keys
def parse_mean_std(value: Any) -> Any:
    """A `mean`/`std` setting as given (YAML or a flag): None, 'auto' or a list; ConfigError for anything else."""

    if value is None or isinstance(value, (list, tuple)):
        return value
    if isinstance(value, str) and value.lower() in ("auto", "none", "null"):
        return "auto" if value.lower() == "auto" else None
    raise ConfigError(f"mean and std must be null (ImageNet's for 3-channel 8-bit data, else auto), 'auto', or a "
                      f"list with one number per channel, got {value!r}")


def check_mean_std_setting(in_chans: int, mean: MeanStd, std: MeanStd) -> None:
    """ConfigError (one line) unless mean/std fit in_chans: both null, or each 'auto' or in_chans numbers."""

    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std (or neither: null), or 'auto'")
    try:
        check_mean_std(mean if isinstance(mean, tuple) else [0.0] * in_chans,
                       std if isinstance(std, tuple) else [1.0] * in_chans, in_chans)
    except DataError as e:
        raise ConfigError(str(e)) from None


def saved_mean_std(config: Optional[Mapping[str, Any]], in_chans: int) -> Optional[Tuple[Tuple[float, ...], ...]]:
    """The resolved (mean, std) stored in a run's config (a checkpoint's 'config'), or None.

    None when the config has no resolved values (older checkpoints, converted files) or they are for
    another channel count (configs without `in_chans` are 3-channel).
    """
    if not isinstance(config, Mapping) or config.get("in_chans", 3) != in_chans:
        return None
    mean, std = config.get("mean"), config.get("std")
    if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)):
        return None
    try:
        return check_mean_std(mean, std, in_chans)
    except DataError:
        return None
