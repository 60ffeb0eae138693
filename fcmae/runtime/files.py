"""The one atomic file write of the project.

Every file a run produces that a reader may open while it is written, or that
a crash must never leave half-written (checkpoints, config.yaml, log.jsonl
rewrites, pictures, converted weights), goes through `write_atomic`: the
content is written to a temporary file in the same folder, flushed to disk,
then renamed over the target (`os.replace` is atomic on POSIX). A crash or an
exception mid-write leaves the previous file intact and no temporary behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

PathLike = Union[str, os.PathLike]


def write_atomic(path: PathLike, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then rename it to `path`.

    Args:
        path: the file to (re)place; missing parent folders are created.
        write: writes the whole content to the open file object it gets.
        binary: open the temporary file in binary (default) or UTF-8 text mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """`text` to `path` (UTF-8), atomically."""
    return write_atomic(path, lambda f: f.write(text), binary=False)
