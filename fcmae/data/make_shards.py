"""An image folder as WebDataset tar shards: `fcmae-make-shards SOURCE OUT` (or `python -m fcmae.data.make_shards`).

SOURCE holds class sub-folders, flat images, or train/ and val/ holding either; OUT gets `{split}-000000.tar`,
... and `_info.json`. A sample is `KEY.EXT`, the source file's bytes unchanged (16-bit PNG, TIFF, .npy too), and
`KEY.cls`, the class index as text, for class folders. Each split is shuffled with `--seed` (every shard mixes
classes) and cut into shards of `--samples_per_shard`. The files are checked first as the trainers check them
(image_io.check_folder); a corrupt file goes in as it is (training skips and reports it), one that cannot be
opened stops the command, naming it.

Resuming: a shard is written as `NAME.tar.partial` and renamed when complete, so no half-written shard has a
final name. `OUT/_make_shards.json` holds the plan's fingerprint (each split's shuffled file list, the seed,
the shard size) and the sizes of the complete shards; the same command again keeps those and writes the rest,
byte for byte as one uninterrupted run would (tar members carry a fixed time). _info.json is written last. An
OUT of another plan, or holding files of its own, is refused. `--verify` reads every shard back (webdataset).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from fcmae.data.folder import IMAGE_EXTENSIONS, PathLike, check_in_chans, list_images
from fcmae.data.image_io import LAYOUTS, DataError, check_folder
from fcmae.data.labelled import class_folders
from fcmae.runtime import lock
from fcmae.runtime.command import run_cli
from fcmae.runtime.errors import CheckpointError, DiskFullError, LockError, UsageError
from fcmae.runtime.files import disk_full_error, flush_to_disk, write_text_atomic

FORMAT_VERSION = 1
INFO_NAME = "_info.json"
PROGRESS_NAME = "_make_shards.json"
PARTIAL_SUFFIX = ".partial"
DEFAULT_SAMPLES_PER_SHARD = 1000
TAR_MTIME = 0  # the time of every tar member: a rerun writes the same bytes
SAMPLE_EXTENSIONS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)
Log = Callable[[str], None]


@dataclass(frozen=True)
class SplitPlan:
    """One split's samples in shard order: the (shuffled) files and their class indices ([] without classes)."""

    name: str
    files: List[Path]
    labels: List[int]

    def shards(self, samples_per_shard: int) -> List[Tuple[str, int, int]]:
        """(file name, first sample, end) of each of the split's shards."""
        return [(f"{self.name}-{start // samples_per_shard:06d}.tar", start,
                 min(start + samples_per_shard, len(self.files)))
                for start in range(0, len(self.files), samples_per_shard)]


@dataclass(frozen=True)
class Plan:
    """What OUT will hold; it depends only on the listing of SOURCE, `seed` and `samples_per_shard`."""

    source: Path
    classes: List[str]
    splits: List[SplitPlan]
    samples_per_shard: int
    seed: int

    def fingerprint(self) -> str:
        listing = {s.name: [path.relative_to(self.source).as_posix() for path in s.files] for s in self.splits}
        text = json.dumps({"format": FORMAT_VERSION, "seed": self.seed, "samples_per_shard": self.samples_per_shard,
                           "classes": self.classes, "splits": listing}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_split(root: Path) -> Tuple[List[str], List[Path], List[int]]:
    """(classes, files, class index of each file) of a split folder: class sub-folders, or flat (no classes)."""
    classes = class_folders(root)
    if not classes:
        return [], list_images(root), []
    loose = sorted(p.name for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_EXTENSIONS))
    if loose:
        raise DataError(f"{root} holds images outside its class folders ({', '.join(loose[:3])}"
                        f"{', ...' if len(loose) > 3 else ''}): move each into its class's folder")
    found = [list_images(root / name) for name in classes]
    empty = [name for name, files in zip(classes, found) if not files]
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty[:5])}")
    return classes, [path for files in found for path in files], [i for i, files in enumerate(found) for _ in files]


def split_roots(source: Path, log: Log) -> Dict[str, Path]:
    """{split: folder}: SOURCE/train and SOURCE/val when SOURCE has train/, else SOURCE itself as 'train'."""
    if not source.exists():
        raise UsageError(f"source folder {source} does not exist")
    if not source.is_dir():
        raise UsageError(f"source {source} is not a folder (expected a folder of images)")
    if not (source / "train").is_dir():
        if (source / "val").is_dir():
            raise UsageError(f"{source} has val/ but no train/: put the training images in {source / 'train'}")
        return {"train": source}
    roots = {split: source / split for split in ("train", "val") if (source / split).is_dir()}
    others = sorted(p.name for p in source.iterdir() if not p.name.startswith(".") and p.name not in roots)
    if others:
        log(f"left out (only train/ and val/ are read): {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}")
    return roots


def plan_shards(source: PathLike, samples_per_shard: Optional[int], seed: int, shard_mb: Optional[float] = None,
                log: Log = print) -> Plan:
    """The plan of the shards of SOURCE; DataError/UsageError for a folder that cannot be sharded.

    Args:
        source: the image folder.
        samples_per_shard: samples in each shard (None: from `shard_mb`, else the default).
        seed: the seed of each split's shuffle.
        shard_mb: aim at shards of about this many MB (samples_per_shard from the files' mean size).
        log: where the notes go.
    """
    source = Path(source).expanduser()
    classes, splits, rng = None, [], random.Random(seed)
    for name, root in split_roots(source, log).items():
        split_classes, files, labels = read_split(root)
        if not files:
            raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, in sub-folders too)")
        if classes is not None and split_classes != classes:
            raise DataError(f"the classes of train/ and val/ differ in {source}: only in train/: "
                            f"{', '.join(sorted(set(classes) - set(split_classes))) or 'none'}; only in val/: "
                            f"{', '.join(sorted(set(split_classes) - set(classes))) or 'none'}")
        classes = split_classes
        order = rng.sample(range(len(files)), len(files))
        splits.append(SplitPlan(name, [files[i] for i in order], [labels[i] for i in order] if labels else []))
    if shard_mb is not None:
        sizes = [os.path.getsize(path) for split in splits for path in split.files]
        samples_per_shard = max(1, round(shard_mb * 1e6 * len(sizes) / max(sum(sizes), 1)))
        log(f"--shard_mb {shard_mb:g}: {samples_per_shard} samples per shard (mean file size "
            f"{sum(sizes) / len(sizes) / 1e3:.0f} kB)")
    return Plan(source, classes or [], splits, samples_per_shard or DEFAULT_SAMPLES_PER_SHARD, seed)


def read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}): make it readable or move it out of the source "
                        "folder, then run the same command again (complete shards are kept)") from None


def write_shard(target: Path, split: SplitPlan, start: int, end: int) -> int:
    """Samples start..end-1 of `split` as the tar `target` (written as TARGET.partial, then renamed); its size."""
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    try:
        with open(partial, "wb") as f:
            with TarWriter(f, encoder=False, mtime=TAR_MTIME) as writer:
                for index in range(start, end):
                    path = split.files[index]
                    sample = {"__key__": f"{index:09d}", path.suffix.lower()[1:]: read_source(path)}
                    if split.labels:
                        sample["cls"] = str(split.labels[index]).encode("ascii")
                    writer.write(sample)
            flush_to_disk(f)
        os.replace(partial, target)
    except BaseException as e:
        partial.unlink(missing_ok=True)
        full = disk_full_error(e, target)
        if full is not None:
            raise full from None
        raise
    return target.stat().st_size


def _other_plan(out: Path, progress: dict, plan: Plan) -> UsageError:
    if progress.get("seed") != plan.seed:
        made_with = f"--seed {progress.get('seed')} (this run: {plan.seed})"
    elif progress.get("samples_per_shard") != plan.samples_per_shard:
        made_with = f"--samples_per_shard {progress.get('samples_per_shard')} (this run: {plan.samples_per_shard})"
    else:
        made_with = f"another list of source files ({progress.get('num_samples')} images then)"
    return UsageError(f"{out} holds shards of another plan, made with {made_with}: rerun with the settings it was "
                      "made with to finish it, or give a new OUT")


def open_progress(out: Path, plan: Plan) -> dict:
    """The progress record of OUT for `plan` (a new one for an empty OUT); UsageError when OUT is not ours."""
    path = out / PROGRESS_NAME
    if path.exists():
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path} cannot be read ({e}): give a new OUT") from None
        if progress.get("plan") != plan.fingerprint():
            raise _other_plan(out, progress, plan)
    else:
        taken = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if taken:
            raise UsageError(f"{out} is not empty ({', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}) and "
                             f"has no {PROGRESS_NAME}: give a new or empty folder")
        progress = {"fcmae_make_shards": FORMAT_VERSION, "plan": plan.fingerprint(), "source": str(plan.source),
                    "seed": plan.seed, "samples_per_shard": plan.samples_per_shard,
                    "num_samples": {s.name: len(s.files) for s in plan.splits}, "done": {}}
    for unfinished in out.glob("*.tar" + PARTIAL_SUFFIX):  # what a killed run was writing
        unfinished.unlink()
    planned = {name for split in plan.splits for name, _, _ in split.shards(plan.samples_per_shard)}
    stray = sorted(p.name for p in out.glob("*.tar") if p.name not in planned)
    if stray:
        raise UsageError(f"{out} holds shards that are not part of this plan ({', '.join(stray[:3])}): give a new OUT")
    return progress


def info_of(plan: Plan) -> dict:
    """The content of OUT/_info.json."""
    shards = {split.name: split.shards(plan.samples_per_shard) for split in plan.splits}
    return {"name": plan.source.resolve().name, "fcmae_shards": FORMAT_VERSION, "classes": plan.classes,
            "splits": {name: {"name": name, "num_samples": sum(end - start for _, start, end in split),
                              "filenames": [shard for shard, _, _ in split],
                              "shard_lengths": [end - start for _, start, end in split]}
                       for name, split in shards.items()}}


def make_shards(source: PathLike, out: PathLike, samples_per_shard: Optional[int] = DEFAULT_SAMPLES_PER_SHARD,
                seed: int = 0, in_chans: int = 3, log: Log = print, *, shard_mb: Optional[float] = None,
                layout: str = "auto", progress_every: int = 10) -> dict:
    """Write (or finish writing) the shards of SOURCE in OUT; returns the content of OUT/_info.json.

    Args:
        source: the image folder (class sub-folders, flat, or train/ and val/ holding either).
        out: the shard folder: new, empty, or one an earlier run with the same plan started.
        samples_per_shard, seed, shard_mb: see `plan_shards`.
        in_chans, layout: the data's channels and .npy layout, for the format check (the trainers' flags).
        log: where progress and notes go.
        progress_every: a progress line after every this many shards written (0: none).
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    in_chans = check_in_chans(in_chans)
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UsageError(f"--samples_per_shard must be 1 or more, got {samples_per_shard}")
    if shard_mb is not None and not shard_mb > 0:
        raise UsageError(f"--shard_mb must be more than 0, got {shard_mb}")
    plan = plan_shards(source, samples_per_shard, seed, shard_mb, log)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise UsageError(f"OUT {out} is inside the source folder {source}: give a folder outside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT {out} exists and is not a folder")
    check_folder([path for split in plan.splits for path in split.files], in_chans, layout, where=str(source))
    with lock.hold(out):
        progress = open_progress(out, plan)
        done = progress["done"]
        jobs = [(split, *shard) for split in plan.splits for shard in split.shards(plan.samples_per_shard)]
        write_text_atomic(out / PROGRESS_NAME, json.dumps(progress, indent=1) + "\n")
        todo = [job for job in jobs
                if not (out / job[1]).is_file() or done.get(job[1]) != os.path.getsize(out / job[1])]
        if len(todo) < len(jobs):
            log(f"{out}: {len(jobs) - len(todo)} of {len(jobs)} shards are complete already; writing the other "
                f"{len(todo)}")
        todo_samples, samples, size, started = sum(end - start for *_, start, end in todo), 0, 0, time.monotonic()
        for number, (split, name, start, end) in enumerate(todo, 1):
            done[name] = write_shard(out / name, split, start, end)
            write_text_atomic(out / PROGRESS_NAME, json.dumps(progress, indent=1) + "\n")
            samples, size = samples + end - start, size + done[name]
            if progress_every and (number % progress_every == 0 or number == len(todo)):
                rate = samples / max(time.monotonic() - started, 1e-9)
                eta = time.strftime("%H:%M:%S", time.gmtime((todo_samples - samples) / max(rate, 1e-9)))
                log(f"{name}: {number}/{len(todo)} shards, {samples:,}/{todo_samples:,} samples, {size / 1e6:,.0f} MB, "
                    f"{rate:,.0f} samples/s, ETA {eta}")
        info = info_of(plan)
        write_text_atomic(out / INFO_NAME, json.dumps(info, indent=1) + "\n")
    return info


def sample_problem(sample: dict, key: str, classes: List[str]) -> str:
    """What is wrong with a sample read back where sample `key` belongs ('' when nothing is)."""
    images = [k for k in sample if not k.startswith("__") and k != "cls"]
    label = sample.get("cls", b"").decode("ascii", "replace")
    if sample["__key__"] != key:
        return f"sample {key} has the key {sample['__key__']}"
    if len(images) != 1 or images[0] not in SAMPLE_EXTENSIONS:
        return f"sample {key} holds {', '.join(images) or 'nothing'}, not one image"
    if classes and not (label.isdigit() and int(label) < len(classes)):
        return f"sample {key} has the class {label or 'none'}, not one of the {len(classes)} classes"
    return f"sample {key} has a class, but _info.json lists none" if label and not classes else ""


def verify_shard(path: Path, first: int, expected: int, classes: List[str],
                 label_counts: List[int]) -> Tuple[int, List[str]]:
    """(samples read, problems) of the shard that should hold samples first..first+expected-1; counts its labels."""
    if not path.is_file():
        return 0, [f"{path.name} is missing"]
    problems, count = [], 0
    try:
        with open(path, "rb") as f:
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": f}])):
                problem = sample_problem(sample, f"{first + count:09d}", classes)
                if problem:
                    problems.append(f"{path.name}: {problem}")
                elif classes:
                    label_counts[int(sample["cls"])] += 1
                count += 1
    except (tarfile.TarError, OSError, ValueError) as e:
        reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__
        return count, [f"{path.name} is corrupt or truncated ({reason}): read {count} of {expected} samples"]
    summary = problems[:1] + ([f"{path.name}: and {len(problems) - 1} more sample(s) like it"] if problems[1:] else [])
    return count, summary + ([f"{path.name} holds {count} samples, _info.json says {expected}"]
                             if count != expected else [])


def verify_shards(out: PathLike, log: Log = print) -> dict:
    """Read back every shard _info.json in OUT lists; {'splits': {split: {shards, samples, labels}}, 'problems'}.

    Args:
        out: the shard folder.
        log: where the counts and problems go.
    """
    out = Path(out).expanduser()
    info_path = out / INFO_NAME
    if not info_path.is_file():
        raise DataError(f"{info_path} does not exist: not a finished shard folder (make it with fcmae-make-shards)")
    try:
        info = json.loads(info_path.read_text())
        classes, splits = list(info["classes"]), dict(info["splits"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{info_path} is not a shard index ({type(e).__name__}: {e})") from None
    report, problems = {}, []
    for name, split in splits.items():
        filenames, lengths = split.get("filenames", []), split.get("shard_lengths", [])
        if len(filenames) != len(lengths) or sum(lengths) != split.get("num_samples"):
            problems.append(f"{name}: _info.json's num_samples, filenames and shard_lengths disagree")
        label_counts, first, read = [0] * len(classes), 0, 0
        for filename, expected in zip(filenames, lengths):
            count, found = verify_shard(out / filename, first, expected, classes, label_counts)
            first, read, problems = first + expected, read + count, problems + found
        report[name] = {"shards": len(filenames), "samples": read, "labels": dict(zip(classes, label_counts))}
        labels = f"; per class: {', '.join(f'{c} {n}' for c, n in zip(classes, label_counts))}" if classes else ""
        log(f"{name}: {read:,} samples in {len(filenames)} shards{labels[:300]}")
    for problem in problems:
        log(f"problem: {problem}")
    return {"splits": report, "problems": problems}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fcmae-make-shards",
        description="Write an image folder (class sub-folders, flat, or train/ and val/) as WebDataset tar shards; "
                    "the same command again finishes an interrupted run. `--verify OUT` checks finished shards.")
    p.add_argument("source", type=Path, nargs="?", help="the image folder (leave out with --verify to only check OUT)")
    p.add_argument("out", type=Path, help="the shard folder: new, empty, or one this command started")
    p.add_argument("--samples_per_shard", type=int, default=None,
                   help=f"samples in each shard (default {DEFAULT_SAMPLES_PER_SHARD}: about 110 MB of ImageNet-size "
                        "JPEGs, big enough for fast sequential reads; 1,282 shards for ImageNet-1k's train set). An "
                        "epoch reads every sample once when the shard count divides by processes x loader workers "
                        "(docs/own-data.md); use --shard_mb for large images")
    p.add_argument("--shard_mb", type=float, default=None,
                   help="instead: aim at shards of about this many MB (from the mean size of the files)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order, so each shard mixes classes (0)")
    p.add_argument("--in_chans", type=int, default=3, help="the images' channels, for the format check (3)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="3-D .npy layout, for the format check (auto)")
    p.add_argument("--verify", action="store_true",
                   help="read every shard in OUT back and compare with _info.json (after writing, with SOURCE)")
    p.add_argument("--progress", type=int, default=10, metavar="N",
                   help="a progress line (samples/s, ETA) every N shards written (default 10; 0: none)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.source is None and not args.verify:
        raise UsageError("give SOURCE and OUT (or --verify OUT to check finished shards)")
    if args.samples_per_shard is not None and args.shard_mb is not None:
        raise UsageError("give --samples_per_shard or --shard_mb, not both")
    if args.source is not None:
        info = make_shards(args.source, args.out, args.samples_per_shard, args.seed, args.in_chans,
                           shard_mb=args.shard_mb, layout=args.layout, progress_every=args.progress)
        splits = ", ".join(f"{s['num_samples']:,} {name} samples in {len(s['filenames'])} shards"
                           for name, s in info["splits"].items())
        print(f"made {args.out}: {splits}; {len(info['classes']) or 'no'} classes")
    if args.verify:
        problems = verify_shards(args.out)["problems"]
        if problems:
            raise DataError(f"{len(problems)} problem(s) in the shards of {args.out} (listed above): delete the "
                            "shards named and run the command that made them again")
        print(f"verified {args.out}: every shard matches {INFO_NAME}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    run_cli("fcmae-make-shards", lambda: run(args), (UsageError, DataError, DiskFullError, LockError, CheckpointError),
            interrupted="stopped; the complete shards are kept: run the same command again to finish")


if __name__ == "__main__":
    main()
