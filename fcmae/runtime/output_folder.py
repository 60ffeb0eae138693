"""A run that stops before training leaves no output folder behind, and never removes one it did not make.

A training command creates its output folder (and any missing folders
above it) when it takes the folder's lock, before it reads its data; bad
input found after that (a data path that does not exist, a kNN folder
without classes, a checkpoint of another model) stops the run. Then the
folders this run created are removed again, when all they hold is what a
start writes: `config.yaml` and the project's hidden temporaries. A folder
that existed before the run is never touched, and nothing is removed once
the run has written anything else (a checkpoint, log.jsonl, TensorBoard's
events, pictures) or while a lock file of another run is in it.

    created = first_missing(cfg.output_dir)        # before any process makes it
    with removed_on_failure(created, enabled=info.is_main):
        ...                                        # take the lock, check the input, train
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from fcmae.runtime.lock import LOCK_NAME

PathLike = Union[str, os.PathLike]

# What a run writes before it trains; a folder holding only these (and empty folders) was not used.
START_FILES = ("config.yaml",)


def first_missing(folder: PathLike) -> Optional[Path]:
    """The top-most folder of `folder`'s path that does not exist yet (`folder` itself or one above); None if it
    exists."""
    path = Path(folder).expanduser().absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def holds_only_start_files(folder: Path) -> bool:
    """Whether every file below `folder` is one a run writes before training (START_FILES, hidden temporaries)."""
    for _, _, names in os.walk(folder):
        for name in names:
            if name == LOCK_NAME or not (name in START_FILES or name.startswith(".")):  # a lock: another run's
                return False
    return True


@contextmanager
def removed_on_failure(created: Optional[Path], enabled: bool = True) -> Iterator[None]:
    """Remove `created` (from `first_missing`) when the block raises and the folder holds only start files.

    Args:
        created: the top-most folder the run is about to create, or None (the output folder exists: nothing is
            ever removed).
        enabled: False on ranks other than 0 (rank 0 alone cleans up).
    """
    try:
        yield
    except BaseException:
        if enabled and created is not None and created.is_dir() and holds_only_start_files(created):
            shutil.rmtree(created, ignore_errors=True)
        raise
