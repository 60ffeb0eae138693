"""Training and evaluation sets read from WebDataset shards (fcmae.data.shards, fcmae.data.shard_stream).

- `ShardImages`: pre-training's set, the folder's augmentation
  (fcmae.data.folder.PretrainCrops) on a shard stream; labels unused.
- `LabelledShards`: fine-tuning's training set, (image, label) pairs with
  the run's transform, seeded per sample as the labelled folders are.
- `ShardEvalSet`: an evaluation split, every sample exactly once over the
  ranks and loader workers (slot g reads shards g, g + slots, ...), in
  order; an unreadable sample is an error, as in a labelled folder.
- `ProbeSet`: the first samples of a few shards, read when the set is made,
  for the format check, 'auto' channel statistics and the reconstruction
  picture.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from fcmae.data.folder import PretrainCrops, check_in_chans, unreadable_reason
from fcmae.data.gpu_decode import resolve_decode
from fcmae.data.image_io import (
    LAYOUTS,
    UNREADABLE_IMAGE_ERRORS,
    DataError,
    ImageFormatError,
    UnreadableImageError,
    check_folder,
)
from fcmae.data.labelled import TensorTrainTransform, Transformed, seeded_rngs
from fcmae.data.shard_stream import ShardStream
from fcmae.data.shards import Entry, ShardSpec, probe_entries, read_shard
from fcmae.data.stats import resolve_mean_std

PROBE_SAMPLES = 256


class ProbeSet:
    """The first readable samples of a few shards, checked to share one format (`dtype`, `infos`).

    Args:
        spec: the shards.
        in_chans: the data's channel count.
        layout: 'auto', 'HWC' or 'CHW' for .npy samples.
        limit: samples read at most.
        label_key: the member suffix holding the class index.
    """

    def __init__(self, spec: ShardSpec, in_chans: int, layout: str = "auto", limit: int = PROBE_SAMPLES,
                 label_key: str = "cls"):
        if layout not in LAYOUTS:
            raise DataError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
        self.in_chans, self.layout = check_in_chans(in_chans), layout
        self.entries: List[Entry] = probe_entries(spec, limit, label_key)
        try:
            self.infos = check_folder([(e.name, e.data) for e in self.entries], self.in_chans, layout, limit,
                                      spec.where)
        except ImageFormatError as e:
            raise DataError(str(e)) from None
        self.dtype = self.infos[0].dtype
        self.bit_depth = self.infos[0].bit_depth

    def __len__(self) -> int:
        return len(self.entries)

    def load_unit(self, index: int) -> torch.Tensor:
        with self.entries[index].open(self.layout, self.in_chans, self.dtype) as image:
            return image.read_unit(self.in_chans)


class ShardImages(PretrainCrops, ShardStream):
    """Pre-training's set on shards: the same crops, decoding and normalisation as an image folder.

    Args:
        spec: the shards.
        num_samples: samples per epoch of the whole set (`--train_num_samples` or `_info.json`'s count).
        input_size, crop_scale, in_chans, mean, std, decode, layout, cuda: as fcmae.data.folder.ImageFolderDataset.
        seed: the run's seed (shard order, sample shuffle, crops).
        buffer: the sample shuffle's buffer.
        logger: notes and the channel statistics go here.
    """

    def __init__(self, spec: ShardSpec, num_samples: int, *, input_size: int, crop_scale: Sequence[float] = (0.2, 1.0),
                 in_chans: int = 3, mean=None, std=None, decode: str = "cpu", layout: str = "auto",
                 cuda: Optional[bool] = None, seed: int = 0, buffer: int = 1000, max_retries: int = 20,
                 logger: Callable[[str], None] = print):
        ShardStream.__init__(self, spec, num_samples, seed, buffer, max_retries)
        self.input_size, self.crop_scale, self.crop_ratio = input_size, tuple(crop_scale), (3.0 / 4.0, 4.0 / 3.0)
        self.probe = ProbeSet(spec, in_chans, layout)
        self.in_chans, self.layout, self.dtype, self.bit_depth = (self.probe.in_chans, layout, self.probe.dtype,
                                                                  self.probe.bit_depth)
        self.decode = resolve_decode(decode, self.probe.infos, self.in_chans, self.dtype, cuda)
        self.mean, self.std = resolve_mean_std(mean, std, self.probe, logger=logger)
        self._decoders, self._affine = {}, None

    def make_item(self, entry: Entry, index: int):
        with entry.open(self.layout, self.in_chans, self.dtype) as image:
            return self.crop_image(image, index)

    def fixed_batch(self, count: int, source=None):
        return super().fixed_batch(count, self.probe if source is None else source)


class LabelledShards(ShardStream):
    """Fine-tuning's training set on shards: ((image, label), bad) items, `transform` seeded per sample.

    The format (`in_chans`, `dtype`, `bit_depth`, `uses_pil`) is the labelled folder's
    (fcmae.data.labelled.LabelledFolder); `probe` holds the first samples of a few shards (channel statistics).

    Args:
        spec: the shards.
        num_samples: samples per epoch of the whole set.
        num_classes: the class count; a label outside 0..num_classes-1 is an error naming the sample.
        in_chans, layout: the data's channels and .npy layout.
        seed: the run's seed.
        buffer: the sample shuffle's buffer.
        label_key: the member suffix holding the class index.
    """

    def __init__(self, spec: ShardSpec, num_samples: int, num_classes: int, *, in_chans: int = 3,
                 layout: str = "auto", seed: int = 0, buffer: int = 1000, max_retries: int = 20,
                 label_key: str = "cls"):
        ShardStream.__init__(self, spec, num_samples, seed, buffer, max_retries, label_key)
        self.probe = ProbeSet(spec, in_chans, layout, label_key=label_key)
        self.in_chans, self.layout, self.dtype, self.bit_depth = (self.probe.in_chans, layout, self.probe.dtype,
                                                                  self.probe.bit_depth)
        self.uses_pil = self.dtype == "uint8" and self.in_chans == 3
        self.num_classes = num_classes
        self.transform = None
        check_labels(self.probe.entries, num_classes, label_key)

    def make_item(self, entry: Entry, index: int):
        seed = self.sample_seed(index)
        with entry.open(self.layout, self.in_chans, self.dtype) as image:
            if self.uses_pil:
                picture = image.read_pil(self.in_chans)
            elif isinstance(self.transform, TensorTrainTransform):
                with seeded_rngs(seed):
                    picture = Transformed(self.transform.from_file(image, self.in_chans))
            else:
                picture = image.read_unit(self.in_chans)
        label = check_label(entry, self.num_classes, self.label_key)
        if isinstance(picture, Transformed):
            return picture.tensor, label
        if self.transform is None:
            return picture, label
        with seeded_rngs(seed):
            return self.transform(picture), label


class ShardEvalSet(IterableDataset):
    """An evaluation split on shards: (image, label), every sample once over all ranks and workers, in order.

    Args:
        spec: the shards.
        num_classes: the class count.
        in_chans, layout: the data's channels and .npy layout.
        label_key: the member suffix holding the class index.
    """

    def __init__(self, spec: ShardSpec, num_classes: int, *, in_chans: int = 3, layout: str = "auto",
                 label_key: str = "cls"):
        self.spec, self.num_classes, self.label_key = spec, num_classes, label_key
        self.probe = ProbeSet(spec, in_chans, layout, label_key=label_key)
        self.in_chans, self.layout, self.dtype, self.bit_depth = (self.probe.in_chans, layout, self.probe.dtype,
                                                                  self.probe.bit_depth)
        self.uses_pil = self.dtype == "uint8" and self.in_chans == 3
        self.transform = None
        self.rank, self.ranks = 0, 1
        check_labels(self.probe.entries, num_classes, label_key)

    def __len__(self) -> int:
        """The samples of the whole split when `_info.json` gives them, else those of the probe (a lower bound)."""
        return self.spec.num_samples if self.spec.num_samples is not None else len(self.probe)

    def split(self, rank: int, ranks: int) -> None:
        """Read this rank's part only (split further over loader workers; see `__iter__`)."""
        self.rank, self.ranks = rank, ranks

    def __iter__(self):
        """Reader g of the ranks x workers reads shards g, g + readers, ...; with fewer shards than readers every
        reader reads all shards and keeps samples g, g + readers, ... (no rank is left without samples)."""
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        readers, reader = self.ranks * workers, self.rank * workers + worker_id
        counts, shards = self.spec.counts, len(self.spec.urls)
        by_shard = shards >= readers
        position = 0
        for i in range(reader, shards, readers) if by_shard else range(shards):
            for entry in read_shard(self.spec.urls[i], counts[i] if counts is not None else None, self.label_key):
                if by_shard or position % readers == reader:
                    yield self._item(entry)
                position += 1

    def _item(self, entry: Entry):
        try:
            with entry.open(self.layout, self.in_chans, self.dtype) as image:
                picture = image.read_pil(self.in_chans) if self.uses_pil else image.read_unit(self.in_chans)
        except UNREADABLE_IMAGE_ERRORS as e:
            raise UnreadableImageError(
                f"unreadable sample {entry.name} ({unreadable_reason(e)}); evaluation does not skip samples "
                "(another in its place would bias the accuracy): fix or remake the shard") from None
        label = check_label(entry, self.num_classes, self.label_key)
        return (self.transform(picture) if self.transform is not None else picture), label


class LabelError(UnreadableImageError):
    """A sample without a class index or with one outside the classes: the run stops, naming it (no other sample
    may stand in for it: the data or the class count is wrong, and every rank stops together)."""


def check_label(entry: Entry, num_classes: int, label_key: str) -> int:
    """The entry's class index, checked to be one of num_classes (LabelError naming the sample)."""
    if entry.label is None and entry.label_text is not None:
        raise LabelError(f"sample {entry.name} has .{label_key} {entry.label_text[:20]!r}, not a class index")
    if entry.label is None:
        raise LabelError(f"sample {entry.name} has no .{label_key} label: labelled shards need one per sample "
                         "(fcmae-make-shards writes them from class folders)")
    if not 0 <= entry.label < num_classes:
        raise LabelError(f"sample {entry.name} has label {entry.label}, outside the {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return entry.label


def check_labels(entries: Sequence[Entry], num_classes: int, label_key: str) -> None:
    for entry in entries:
        check_label(entry, num_classes, label_key)
