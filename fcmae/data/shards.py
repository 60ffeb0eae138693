"""WebDataset tar shards as training data: which shards a `--data_path` names, their counts, their samples.

A shard is a tar file whose members sharing a key make one sample
(`000123.jpg`, `000123.cls`); the `webdataset` package reads the tar stream
and groups the members (its `gopen` also runs `pipe:` commands). The format
that fcmae-make-shards writes, and `_info.json`, are described in
docs/own-data.md ("Sharded data sets").

What a `--data_path` names (`find_shards`):
- a brace pattern, `/data/train-{000000..000099}.tar`, expanded in order;
- a `pipe:COMMAND` URL, braces expanded too (`pipe:aws s3 cp s3://b/train-{0000..0099}.tar -`);
- one `.tar` file;
- a folder holding `.tar` files: those of the split (`train-*.tar`, or the
  `train/` sub-folder's) when it has them, else all of them;
- anything else is not shards (an image folder; None).

Sample counts come from `_info.json` beside the first local shard (timm's
convention: `splits.<split>.filenames` and `shard_lengths`) when it lists
every shard named; a stream has no length otherwise.

Reading a shard (`read_shard`) yields `Entry`s: the sample's image bytes
(the first member whose suffix is an image format), its label and its name
(`shard.tar:key.ext`). With known counts a shard gives exactly its count:
a shard cut short (truncated, corrupt, a failing `pipe:` command) gives
unreadable entries for the samples it lost, so that every later position in
the stream stays where it was. A local shard that does not exist is a
MissingShardError: it stops the run (the last checkpoint is kept).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from fcmae.data.folder import IMAGE_EXTENSIONS
from fcmae.data.image_io import DataError, ImageFile, UnreadableImageError

INFO_FILE = "_info.json"
IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# What reading a tar stream raises for a shard that is truncated or not a tar (tarfile's errors), or for a
# `pipe:` command that fails (webdataset's gopen: OSError when the command exits non-zero).
SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


class MissingShardError(UnreadableImageError):
    """A local shard that does not exist (any more): the run stops; the message names it."""


@dataclass(frozen=True)
class ShardSpec:
    """The shards a data path names, in order, with what `_info.json` says of them.

    Args:
        urls: the shards: local paths or `pipe:` URLs.
        counts: the samples of each shard (from `_info.json`), or None when unknown.
        classes: the class names in label order (from `_info.json`), empty when unknown or unlabelled.
        where: the data path as given, for messages.
    """

    urls: Tuple[str, ...]
    counts: Optional[Tuple[int, ...]]
    classes: Tuple[str, ...]
    where: str

    @property
    def num_samples(self) -> Optional[int]:
        return sum(self.counts) if self.counts is not None else None

    def describe(self) -> str:
        count = f"{self.num_samples} samples" if self.counts is not None else "sample count not known"
        return f"{len(self.urls)} shard(s) ({count}) from {self.where}"


def is_local(url: str) -> bool:
    return not url.startswith("pipe:")


def _split_tars(folder: Path, split: str) -> List[Path]:
    """The `.tar` files of `split` in `folder`: `<split>-*.tar` or `<split>_*.tar`, else `<split>/*.tar`."""
    tars = sorted(p for p in folder.glob("*.tar") if p.is_file())
    named = [p for p in tars if p.name.startswith((f"{split}-", f"{split}_"))]
    if named:
        return named
    if (folder / split).is_dir():
        return sorted(p for p in (folder / split).glob("*.tar") if p.is_file())
    return []


def find_shards(data_path, split: str = "train", any_split: bool = True) -> Optional[ShardSpec]:
    """The shards `data_path` names (see the module docstring), or None when it names no shards.

    `any_split`: a folder whose `.tar` files carry no split name gives all of them (pre-training); fine-tuning
    asks for named splits only. A spec that matches no file is a DataError, before any compute.
    """
    text = str(data_path)
    if text.startswith("pipe:"):
        urls = expand_urls(text)
    elif "{" in text and ".tar" in text:
        urls = [str(Path(u).expanduser()) for u in expand_urls(text)]
        missing = [u for u in urls if not Path(u).is_file()]
        if len(missing) == len(urls):
            raise DataError(f"no shard matches {text}: none of its {len(urls)} file(s) exists (e.g. {missing[0]})")
        if missing:
            raise DataError(f"{len(missing)} of the {len(urls)} shards of {text} do not exist, e.g. {missing[0]}")
    else:
        path = Path(text).expanduser()
        if path.is_file() and path.suffix == ".tar":
            urls = [str(path)]
        elif path.is_dir():
            tars = _split_tars(path, split)
            if not tars and any_split and not _split_tars(path, "val"):
                tars = sorted(p for p in path.glob("*.tar") if p.is_file())
            if not tars:
                return None
            urls = [str(p) for p in tars]
        else:
            return None
    counts, classes = read_counts(urls)
    return ShardSpec(tuple(urls), counts, classes, text)


def read_counts(urls: Sequence[str]) -> Tuple[Optional[Tuple[int, ...]], Tuple[str, ...]]:
    """(samples per shard, class names) from the `_info.json` beside the first shard; (None, ()) when there is
    none or it does not list every shard. A broken `_info.json` is a DataError."""
    if not urls or not is_local(urls[0]):
        return None, ()
    info_path = Path(urls[0]).parent / INFO_FILE
    if not info_path.is_file():
        return None, ()
    try:
        info = json.loads(info_path.read_text())
        lengths: Dict[str, int] = {}
        for split in info.get("splits", {}).values():
            lengths.update({os.path.basename(name): int(n)
                            for name, n in zip(split["filenames"], split["shard_lengths"])})
        classes = tuple(str(c) for c in info.get("classes", []))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{info_path} is not a readable shard index ({type(e).__name__}: {e}); fix it, or "
                        "remove it and give --train_num_samples") from None
    names = [os.path.basename(u) for u in urls]
    same_folder = all(Path(u).parent == info_path.parent for u in urls)  # an index counts its own folder's shards
    if not same_folder or not all(name in lengths for name in names):
        return None, classes
    return tuple(lengths[name] for name in names), classes


def epoch_samples(train_num_samples: Optional[int], spec: ShardSpec, log: Callable[[str], None] = print) -> int:
    """The samples an epoch of the training shards holds: `train_num_samples` (--train_num_samples) when given,
    else `_info.json`'s count; a DataError when neither gives one."""
    if train_num_samples is not None:
        if spec.num_samples is not None and spec.num_samples != train_num_samples:
            log(f"note: train_num_samples {train_num_samples} is used, though the shards' {INFO_FILE} counts "
                f"{spec.num_samples} samples")
        return train_num_samples
    if spec.num_samples is None:
        raise DataError(f"the shards {spec.where} have no sample count (no {INFO_FILE} beside them lists them): "
                        "give --train_num_samples N, the samples they hold (fcmae-make-shards writes _info.json)")
    return spec.num_samples


@dataclass
class Entry:
    """One sample of a shard as stored: its name, image bytes and label, or why it cannot be read.

    Args:
        name: `shard:key.ext`, as messages and reports give it.
        data: the encoded image (None when unreadable).
        label: the class index (None when the sample has none).
        error: why the sample cannot be read (None when it can).
        lost: the samples this unreadable entry stands for in reports (the rest of a shard cut short: 1 each
            entry, but reported once under the shard's name).
        label_text: the label member as stored, kept for the message when it is not a class index.
    """

    name: str
    data: Optional[bytes] = None
    label: Optional[int] = None
    error: Optional[str] = None
    lost: int = 1
    label_text: Optional[str] = None  # the label member as stored (when it is not a class index: for the message)

    def open(self, layout: str, in_chans: int, dtype: Optional[str] = None) -> ImageFile:
        """The sample's image, opened (OSError for an unreadable entry, as for an unreadable file)."""
        if self.error is not None:
            raise OSError(self.error)
        return ImageFile(self.name, layout, in_chans, dtype, data=self.data)

    def bad_record(self, error: BaseException) -> tuple:
        """The (name, reason, samples) this entry adds to the report of unreadable images."""
        return (self.name, f"{type(error).__name__}: {error}", self.lost)


def sample_entry(url: str, sample: Dict[str, bytes], label_key: str) -> Entry:
    """The Entry of one sample that webdataset grouped (`__key__` and one item per member suffix)."""
    key = sample["__key__"]
    suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    if suffix is None:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
        return Entry(f"{url}:{key}", error=f"no image in sample {key} (members: {members})")
    label, label_text = None, None
    if label_key in sample:
        label_text = sample[label_key].decode(errors="replace").strip()
        label = int(label_text) if label_text.lstrip("-").isdigit() else None
    return Entry(f"{url}:{key}.{suffix}", sample[suffix], label, label_text=label_text)


def local_members(path: str) -> Iterator[Dict[str, bytes]]:
    """The files of a local tar shard as webdataset's tar iterator gives them ({"fname", "data"}), each read in one
    call: tarfile's seekable mode, where webdataset's stream mode reads in 10 kB pieces (6% of the time of a
    2000x1500 JPEG's whole pipeline; fcmae.tools.bench_data's shards row)."""
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isreg() and not member.name.startswith("__"):  # webdataset skips its `__...__` metadata too
                yield {"fname": member.name, "data": tar.extractfile(member).read()}
        # tarfile ends quietly at a header cut short or garbled: a whole archive ends in zero blocks
        tar.fileobj.seek(tar.offset)
        end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
        if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0") or tar.fileobj.read().strip(b"\0"):
            raise tarfile.ReadError(f"no end-of-archive marker after the last readable member at byte {tar.offset}")


def read_shard(url: str, count: Optional[int] = None, label_key: str = "cls", estimate: int = 1) -> Iterator[Entry]:
    """The samples of one shard, in order, as Entries; with `count`, exactly `count` of them (see the module
    docstring); without, a shard cut short ends with one unreadable entry that counts for `estimate` samples. A
    local shard that does not exist is a MissingShardError."""
    if is_local(url) and not os.path.exists(url):
        raise MissingShardError(f"shard {url} does not exist (any more): the data set changed under the run; "
                                "restore it and run the same command again to resume from the last checkpoint")
    given = 0
    try:
        stream = None if is_local(url) else gopen(url, "rb")
        read_to_end = False
        try:
            members = local_members(url) if stream is None else tar_file_iterator(stream)
            for sample in group_by_keys({**member, "__url__": url} for member in members):
                if count is not None and given >= count:
                    break
                yield sample_entry(url, sample, label_key)
                given += 1
            else:
                read_to_end = True
        finally:
            try:
                if stream is not None:
                    stream.close()  # a `pipe:` command's exit status is checked here
            except SHARD_READ_ERRORS:
                if read_to_end:  # else the reader left early and the command was cut off on purpose
                    raise
    except SHARD_READ_ERRORS as e:
        why = f"{type(e).__name__}: {str(e).split(' @ ')[0]}"  # webdataset appends the stream object's repr
        if count is None:  # the shard's own length is not known: one unreadable entry stands for what it lost
            yield Entry(url, error=f"shard cut short after {given} samples ({why})", lost=estimate)
            return
        reason = f"shard cut short after {given} of {count} samples ({why})"
        for _ in range(count - given):
            yield Entry(url, error=reason, lost=count - given)
        return
    if count is not None and given < count:
        reason = f"shard has {given} samples, {count} by {INFO_FILE}"
        for _ in range(count - given):
            yield Entry(url, error=reason, lost=count - given)


def probe_entries(spec: ShardSpec, limit: int, label_key: str = "cls", max_shards: int = 4) -> List[Entry]:
    """Up to `limit` readable samples from the first samples of up to `max_shards` shards spread over the spec,
    for the format check, channel statistics and the reconstruction picture. A `pipe:` command that fails or a
    spec with no readable sample is a one-line DataError."""
    picks = sorted({round(i * (len(spec.urls) - 1) / max(max_shards - 1, 1)) for i in range(max_shards)})
    per_shard = max(1, -(-limit // len(picks)))
    entries: List[Entry] = []
    for i in picks:
        url = spec.urls[i]
        got = []
        for entry in read_shard(url, None, label_key):
            if entry.error is not None and url == entry.name:  # the shard itself could not be read
                if not entries and not got and i == picks[-1]:
                    raise DataError(f"cannot read shard {url}: {entry.error}")
                break
            got.append(entry)
            if len(got) >= per_shard:
                break
        entries += [e for e in got if e.error is None]
    if not entries:
        raise DataError(f"no readable sample in {spec.describe()}")
    return entries[:limit]
