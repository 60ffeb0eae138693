"""The train and val splits of labelled data, as class folders or as WebDataset shards, and their evaluation loaders.

Fine-tuning (and its --eval), fcmae-knn, fcmae-linprobe and pre-training's kNN monitor read a data path that is

- a folder with train/<class>/ and val/<class>/ (fcmae.data.labelled.check_splits), or
- labelled shards (fcmae.data.shards, written by fcmae-make-shards): a folder holding `train-*.tar` and
  `val-*.tar`, or train/ and val/ sub-folders of `.tar` files; or the training split's spec (a brace pattern,
  a `pipe:` URL, one `.tar` file) whose validation spec is the same text with its last `train` replaced by
  `val` (`/data/train-{000000..000099}.tar` -> `/data/val-{000000..000099}.tar`).

The shards' classes are the "classes" of their _info.json; without them the class count must be given
(--num_classes), and the classes are named by their index. Every sample's `.cls` must be one of them
(fcmae.data.shard_sets.LabelError names the sample that is not).

Evaluation reads every sample once (`eval_set`, `eval_loader`): a folder's images every world_size-th from the
rank (fcmae.data.labelled.ShardSampler), a shard split's shards rank, rank + world_size, ...
(fcmae.data.shard_sets.ShardEvalSet), each in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader

from fcmae.data.image_io import DataError
from fcmae.data.labelled import LabelledFolder, ShardSampler, check_splits
from fcmae.data.shard_sets import ShardEvalSet
from fcmae.data.shards import INFO_FILE, ShardSpec, find_shards
from fcmae.runtime.lifeline import loader_worker_init
from fcmae.runtime.loader import usable_workers

SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardSplits:
    """The training and validation shards of a labelled data path.

    Args:
        train: the training split's shards.
        val: the validation split's shards.
        where: the data path as given, for messages.
    """

    train: ShardSpec
    val: ShardSpec
    where: str

    def spec(self, split: str) -> ShardSpec:
        return self.train if split == "train" else self.val

    def describe(self) -> str:
        return f"shards at {self.where} ({len(self.train.urls)} train, {len(self.val.urls)} val)"

    def __str__(self) -> str:
        return self.where


# What a labelled data path names: a folder with train/<class>/ and val/<class>/, or shards.
LabelledData = Union[Path, ShardSplits]


def val_spec_text(train_spec: str) -> str:
    """The validation spec of a training spec: the same text with its last `train` replaced by `val`."""
    at = train_spec.rfind("train")
    if at < 0:
        raise DataError(f"no validation shards for {train_spec}: a shard spec names the training split, with "
                        "'train' in it (its validation split is the same text with the last 'train' replaced by "
                        "'val'), or give the folder holding train-*.tar and val-*.tar")
    return train_spec[:at] + "val" + train_spec[at + len("train"):]


def _is_spec(text: str) -> bool:
    """Whether a data path is a shard spec rather than a folder: a `pipe:` URL, a brace pattern or a .tar file."""
    return text.startswith("pipe:") or ("{" in text and ".tar" in text) or text.endswith(".tar")


def find_shard_splits(data_path, purpose: str = "fine-tuning") -> Optional[ShardSplits]:
    """The labelled shards `data_path` names (see the module docstring), or None when it names none (a folder of
    class folders, or nothing). A folder or spec that names only one split is a DataError."""
    text = str(data_path)
    if not _is_spec(text):
        folder = Path(text).expanduser()
        if not folder.is_dir():
            return None
        found = {split: find_shards(folder, split, any_split=False) for split in SPLITS}
        if found["train"] is None and found["val"] is None:
            if any(p.is_file() for p in folder.glob("*.tar")):
                raise DataError(f"{folder} holds .tar files but none named train-*.tar or val-*.tar: {purpose} "
                                "reads labelled shards as train-*.tar and val-*.tar (or train/ and val/ "
                                "sub-folders of .tar files)")
            return None
        for split, spec in found.items():
            if spec is None:
                raise DataError(f"{folder} has no {split} shards ({split}-*.tar, or .tar files in {split}/): "
                                f"{purpose} needs both train and val shards")
        return ShardSplits(found["train"], found["val"], text)
    train = find_shards(text, "train")
    if train is None:
        raise DataError(f"shard {text} does not exist")
    val_text = val_spec_text(text)
    try:
        val = find_shards(val_text, "val")
    except DataError as e:
        raise DataError(f"no validation shards for {text} ({purpose} reads them from {val_text}, the same spec "
                        f"with 'val' for its last 'train'): {e}") from None
    if val is None:
        raise DataError(f"no validation shards for {text}: {val_text} (the same spec with 'val' for its last "
                        f"'train') does not exist; {purpose} needs both splits")
    return ShardSplits(train, val, text)


def shard_classes(splits: ShardSplits, num_classes: Optional[int], flag: Optional[str] = "--num_classes") -> List[str]:
    """The class names of labelled shards: their _info.json's, checked against `num_classes` when given; else
    `num_classes` indices ("0", "1", ...). DataError when neither gives them (`flag`: the setting to give)."""
    named = {split: splits.spec(split).classes for split in SPLITS}
    if named["train"] and named["val"] and named["train"] != named["val"]:
        only_train = sorted(set(named["train"]) - set(named["val"]))
        only_val = sorted(set(named["val"]) - set(named["train"]))
        raise DataError(f"the classes of the train and val shards of {splits.where} differ: only in train: "
                        f"{', '.join(only_train) or 'none (another order)'}; only in val: "
                        f"{', '.join(only_val) or 'none'}")
    classes = list(named["train"] or named["val"])
    if classes:
        if num_classes is not None and num_classes != len(classes):
            raise DataError(f"num_classes is {num_classes} but the shards at {splits.where} have {len(classes)} "
                            f"classes (their {INFO_FILE}); drop --num_classes / --nb_classes or fix the data")
        return classes
    if num_classes is None:
        hint = f"give {flag} N (labels 0..N-1)" if flag else f"fcmae-make-shards writes an {INFO_FILE} naming them"
        raise DataError(f"the shards at {splits.where} name no classes (no {INFO_FILE} with \"classes\" beside "
                        f"them): {hint}")
    return [str(i) for i in range(num_classes)]


def find_labelled_data(data_path, purpose: str = "fine-tuning", num_classes: Optional[int] = None,
                       flag: Optional[str] = "--num_classes") -> Tuple[LabelledData, List[str]]:
    """(folder or ShardSplits, class names) of a labelled data path, checked (before any image is decoded).

    Args:
        data_path: the path as given (a shard spec is kept as text: `pipe:` commands hold URLs).
        purpose: what reads it, for messages ("fcmae-knn needs ...").
        num_classes: the class count given, for shards without classes in their _info.json (a folder's class
            count is checked by the caller).
        flag: the setting that gives the class count (None: there is none).
    """
    splits = find_shard_splits(data_path, purpose)
    if splits is not None:
        return splits, shard_classes(splits, num_classes, flag)
    root = Path(data_path).expanduser()
    return root, check_splits(root, purpose)


def eval_set(data: LabelledData, split: str, classes: List[str], *, in_chans: int = 3,
             layout: str = "auto") -> Union[LabelledFolder, ShardEvalSet]:
    """The (image, label) set of one split for evaluation (no sample replaced by another); set its `transform`."""
    if isinstance(data, ShardSplits):
        return ShardEvalSet(data.spec(split), len(classes), in_chans=in_chans, layout=layout)
    return LabelledFolder(data / split, classes, in_chans=in_chans, layout=layout)


def split_size(dataset) -> Optional[int]:
    """The samples of an evaluation set (`eval_set`), None when not known (shards without an _info.json)."""
    return dataset.spec.num_samples if isinstance(dataset, ShardEvalSet) else len(dataset)


def split_name(data: LabelledData, split: str) -> str:
    """The split, for messages: its folder, or `the val shards of SPEC`."""
    return f"the {split} shards of {data.where}" if isinstance(data, ShardSplits) else str(data / split)


def eval_loader(dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1, pin: bool = False,
                generator: Optional[torch.Generator] = None) -> DataLoader:
    """This rank's part of an evaluation set, every sample read once over the ranks, in order (see the module
    docstring); loader workers capped at the CPUs (usable_workers) and ending with their process."""
    common = dict(batch_size=batch_size, num_workers=usable_workers(num_workers), pin_memory=pin,
                  generator=generator, worker_init_fn=loader_worker_init)
    if isinstance(dataset, ShardEvalSet):
        dataset.split(rank, world_size)
        return DataLoader(dataset, **common)
    return DataLoader(dataset, sampler=ShardSampler(len(dataset), rank, world_size), **common)
