"""The one atomic file write of the project, and what a full disk or a killed write leaves.

Every file a run produces that a reader may open while it is written, or that
a crash must never leave half-written (checkpoints, config.yaml, log.jsonl
rewrites, pictures, converted weights), goes through `write_atomic`: the
content is written to a temporary file in the same folder, flushed to disk
(`flush_to_disk`, the one place where every writer's data reaches the disk),
then renamed over the target (`os.replace` is atomic on POSIX). An exception
mid-write leaves the previous file intact and no temporary behind; the new
file gets the permissions the umask allows (not mkstemp's 0600).

A folder written whole (the Hugging Face export) is built the same way in
a `temporary_folder` next to it, then renamed into place.

A process killed mid-write (SIGKILL, node failure) leaves its temporary
`.<name>.<host>.<pid>.<random>.tmp` (a file, or a folder of
`temporary_folder`). `remove_stale_temporaries` deletes those: in an output
folder whose lock is held (fcmae.runtime.lock) every temporary of the
project is stale; elsewhere (the converter's output folder) only those of
dead processes on this host are.

A full disk (ENOSPC, or EDQUOT for a quota) becomes `DiskFullError`, whose
message names the folder, the space needed and the space free. torch.save
reports it as a RuntimeError with the OSError only in the exception chain;
`disk_full_error` looks there too.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO, Callable, List, Optional, Union

from fcmae.runtime.errors import DiskFullError

PathLike = Union[str, os.PathLike]

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEMPORARY = re.compile(r"^\..+\.tmp$|^\.write-test-")  # write_atomic's, save_checkpoint's link, the probe
# A temporary that names its writer (write_atomic's, temporary_folder's): .NAME.HOST.PID.RANDOM.tmp
_WRITER = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def host_name() -> str:
    """This machine's name as temporaries and locks record it (no dots, so file names parse)."""
    return socket.gethostname().split(".")[0] or "localhost"


def _umask() -> int:
    try:  # Linux >= 4.7: read without changing it (os.umask is process-wide and racy)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def flush_to_disk(f: IO) -> None:
    """Flush `f` and fsync it (where a full disk shows on file systems that allocate late, NFS among them)."""
    f.flush()
    os.fsync(f.fileno())


def _human(size: Optional[float]) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"


def disk_full_error(error: BaseException, path: PathLike, needed: Optional[int] = None,
                    keeps_previous: bool = True) -> Optional[DiskFullError]:
    """A DiskFullError for `path` when `error` (or an exception it chains) is ENOSPC/EDQUOT; else None.

    `keeps_previous`: the message says that the previous file (if any) is intact (an atomic write's).
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            break
        seen = seen.__cause__ or seen.__context__
    else:
        return None
    folder = Path(path).parent
    try:
        free: Optional[int] = shutil.disk_usage(folder).free
    except OSError:
        free = None
    reason = "disk quota exceeded" if seen.errno == errno.EDQUOT else "no space left on device"
    need = f"about {_human(needed)}" if needed else "more"
    kept = f"; the previous {Path(path).name} (if any) is intact" if keeps_previous else ""
    return DiskFullError(seen.errno, f"{reason} in {folder} while writing {Path(path).name}: it needs {need}, "
                                     f"{_human(free)} is free{kept}. Free some space or use another output folder, "
                                     "then run again")


def write_atomic(path: PathLike, write: Callable[[IO], None], size_hint: Optional[int] = None) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then rename it to `path`.

    Args:
        path: the file to (re)place; missing parent folders are created.
        write: writes the whole content to the open (binary) file object it gets.
        size_hint: the expected size in bytes, for the message when the disk is full.

    Raises:
        DiskFullError: no space or quota left (the temporary file is removed).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            flush_to_disk(f)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_full_error(e, path, size_hint)
        if full is not None:
            raise full from None
        raise
    return path


def _temporary_prefix(path: Path) -> str:
    """The start of the name of a temporary of `path`: `.NAME.HOST.PID.` (the writer, for the cleaner)."""
    return f".{path.name}.{host_name()}.{os.getpid()}."


def temporary_folder(path: PathLike) -> Path:
    """A new empty folder next to `path`, named like write_atomic's temporaries, to be filled and renamed to `path`.

    It gets the permissions the umask allows (tempfile.mkdtemp's are 0700), so that the renamed folder has
    them; `remove_stale_temporaries` removes it once its writer is dead.
    """
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder


def write_text_atomic(path: PathLike, text: str) -> Path:
    """`text` to `path` (UTF-8), atomically."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data), size_hint=len(data))


def remove_stale_temporaries(folder: PathLike, name: Optional[str] = None, all_hosts: bool = True) -> List[Path]:
    """Delete temporaries of killed writes in `folder`; returns what was removed.

    Args:
        folder: the folder to clean (not its subfolders).
        name: only the temporaries of this target file (None: of every file).
        all_hosts: every temporary is stale (the caller holds the folder's lock); False: only
            those of processes of this host that are gone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if not _TEMPORARY.match(entry.name) or (name is not None and not entry.name.startswith(f".{name}.")):
            continue
        writer = _WRITER.match(entry.name)
        if not all_hosts and (writer is None or writer["host"] != host_name() or pid_alive(int(writer["pid"]))):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_file():
                entry.unlink()
            elif entry.is_dir() and writer is not None:  # only folders named as temporary_folder names them
                shutil.rmtree(entry)
            else:
                continue
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return not stat.rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True
