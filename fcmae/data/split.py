"""A labelled folder from images sorted by class: `python -m fcmae.data.split SOURCE TARGET`.

    SOURCE/<class>/*.jpg  ->  TARGET/train/<class>/...  and  TARGET/val/<class>/...

Fine-tuning, the kNN monitor and the linear probe read train/ and val/
(fcmae.data.labelled); pre-training reads TARGET/train/. Each class's images
are shuffled (seeded: the same split every time) and `--val_fraction` of them
(default 0.2, rounded, at least one) go to val/, the rest to train/; each
class needs 2 images or more. Images in folders below a class folder keep
their place (TARGET/train/<class>/2024/x.jpg). Files are hard-linked where
the file system allows (no space used), else copied; SOURCE is never changed.
TARGET is written under a temporary name and renamed when complete, so a
failed split leaves nothing behind; it must not exist yet (or be empty).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fcmae.data.folder import IMAGE_EXTENSIONS, list_images
from fcmae.data.labelled import class_folders
from fcmae.runtime.command import run_cli
from fcmae.runtime.errors import UsageError


def split_class(files: Sequence[Path], val_fraction: float, rng: random.Random) -> Tuple[List[Path], List[Path]]:
    """(train, val) of one class's files: `val_fraction` of them (rounded, at least one) to val, in sorted order."""
    shuffled = list(files)
    rng.shuffle(shuffled)
    val_count = min(max(round(len(files) * val_fraction), 1), len(files) - 1)
    return sorted(shuffled[val_count:]), sorted(shuffled[:val_count])


def plan_split(source: Path, val_fraction: float, seed: int) -> Dict[str, Tuple[List[Path], List[Path]]]:
    """{class: (train files, val files)} for SOURCE/<class>/; UsageError for a folder that cannot be split."""
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder (expected one sub-folder of images per class)")
    if (source / "train").is_dir() and (source / "val").is_dir():
        raise UsageError(f"{source} is split already (it has train/ and val/): give it as --data_path as it is")
    classes = class_folders(source)
    if not classes:
        raise UsageError(f"{source} has no class sub-folders: put each class's images in a folder of its own "
                         f"({source}/<class>/...); pre-training alone takes the folder as it is (--data_path)")
    loose = [p.name for p in source.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        raise UsageError(f"{source} holds images outside the class folders ({', '.join(sorted(loose)[:3])}"
                         f"{', ...' if len(loose) > 3 else ''}): move each into its class's folder")
    rng = random.Random(seed)
    split = {}
    for name in classes:
        files = list_images(source / name)
        if len(files) < 2:
            raise UsageError(f"class folder {source / name} has {len(files)} image(s): each class needs 2 or more "
                             "(one for val/)")
        split[name] = split_class(files, val_fraction, rng)
    return split


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link `source` as `target`, or copy it where links cannot be made; True when linked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copy2(source, target)
        return False


def write_split(source: Path, target: Path, split: Dict[str, Tuple[List[Path], List[Path]]]) -> bool:
    """TARGET/train/<class>/ and TARGET/val/<class>/, written complete or not at all; True when all are links."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target} exists and is not an empty folder: give a new folder for the split")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    linked = True
    try:
        for name, (train, val) in split.items():
            for part, files in (("train", train), ("val", val)):
                for path in files:
                    linked &= _link_or_copy(path, partial / part / name / path.relative_to(source / name))
        if target.exists():
            target.rmdir()  # empty, checked above
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return linked


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fcmae.data.split",
                                description="Split SOURCE/<class>/ images into TARGET/train/<class>/ and "
                                            "TARGET/val/<class>/ (hard links, else copies).")
    p.add_argument("source", type=Path, help="a folder with one sub-folder of images per class")
    p.add_argument("target", type=Path, help="the labelled folder to make (must not exist yet)")
    p.add_argument("--val_fraction", type=float, default=0.2, help="share of each class for val/ (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    split = plan_split(args.source, args.val_fraction, args.seed)
    linked = write_split(args.source, args.target, split)
    train = sum(len(train_files) for train_files, _ in split.values())
    val = sum(len(val_files) for _, val_files in split.values())
    print(f"made {args.target}: {len(split)} classes, {train} train and {val} val images "
          f"({'hard links to' if linked else 'copied from'} {args.source})")
    if len(split) <= 20:
        for name, (train_files, val_files) in split.items():
            print(f"  {name:<20} {len(train_files)} train, {len(val_files)} val")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    run_cli("fcmae-split", lambda: run(args), (UsageError,))


if __name__ == "__main__":
    main()
