"""One training run per output folder: a lock that rank 0 holds, from before the run writes anything to its end.

Rank 0 opens `OUTPUT/.fcmae.lock` and takes an exclusive `flock` on it
(LOCK_EX | LOCK_NB), held on the open file for the run's lifetime; the file
records the holder as one line of JSON: host, pid, when it started and
the command line. A second run in the folder cannot take it and stops
with one line naming the holder (LockError, exit 5); it changes nothing in
the folder.

The kernel drops the lock when the holding process ends, however it ends
(an exception, SIGKILL, a crash): a dead run's lock is free at once and the
next run takes it; nothing is ever judged stale. Processes forked by the
holder (loader workers) close their copy of the lock's file, so a worker
that outlives a killed holder does not keep the folder locked. A node that
dies holding the lock on a network file system keeps it until the server
notices (NFSv4: its lease time, about 90 s).

The file is removed at the end of the run (a killed run leaves it, unlocked,
with its holder's details). Removing it is safe against a run that opened it
just before: that run checks, once its flock succeeds, that the path still
names the file it locked, and starts over if not. Do not remove a held lock
file by hand: a run started after that would take a new one.

File systems: flock must lock across machines where runs of several nodes
share the output folder. It does on local disks, NFSv4 (Linux maps flock to
NFS byte-range locks; NFSv3 needs its lock manager) and Lustre mounted
with `-o flock`; check other parallel file systems' settings. Lustre's `localflock` and NFS's `nolock` mount
options make it local to one machine, where only runs on the same node
exclude each other. Where flock is unsupported (Lustre mounted without
`flock`, NFS without a lock manager) the run stops with one line saying so.
On NFS the lock is a POSIX lock of the whole file underneath: it belongs to
the process, not to the open file, so there a second lock taken in the same
process is not refused, and the holder must not open and close the file
again (which would drop the lock); nothing in the holder does.

Once the lock is held, the project's temporaries of killed writes in the
folder are removed (fcmae.runtime.files.remove_stale_temporaries).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Set

from fcmae.runtime import files
from fcmae.runtime.checkpoint import check_writable
from fcmae.runtime.errors import LockError

LOCK_NAME = ".fcmae.lock"
# errnos of a file system that cannot flock (Lustre without `-o flock`, NFS without a lock manager)
UNSUPPORTED_ERRNOS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)
OWNER_WAIT_S = 1.0  # how long a refused run waits for the holder to write its details

# The lock files this process holds: closed in every child it forks (`_close_in_child`).
_HELD: Set[int] = set()


def _close_in_child() -> None:
    """After a fork: close the child's copies of held lock files (the parent keeps its locks)."""
    for fd in _HELD:
        try:
            os.close(fd)  # not flock(LOCK_UN): that would release the parent's lock too
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _describe(owner: Dict[str, Any]) -> str:
    if "pid" not in owner:
        return "its details are not written yet"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started', '?')}: " \
           f"{owner.get('command', '?')}"


class OutputLock:
    """The lock of one output folder (see the module docstring).

    Args:
        folder: the output folder (created if needed).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owner = {"host": files.host_name(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": " ".join(sys.argv)[:500]}
        self._fd: Optional[int] = None

    def read_owner(self) -> Optional[Dict[str, Any]]:
        """The holder as recorded in the lock file; None when there is none, {} when it is empty or unreadable."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputLock":
        """Take the lock or raise LockError naming the holder; removes stale temporaries once held.

        An output folder that cannot be created or written is a CheckpointError, a full disk a
        DiskFullError naming the folder (one-line errors); nothing is left behind.
        """
        check_writable(self.folder)
        while self._fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockError(f"{self.folder} is in use by another run ({_describe(self._holder())}); wait for "
                                "it to end, or use another --output_dir") from None
            except OSError as e:
                if os.fstat(fd).st_size == 0:  # created by this open (no run can hold a lock here)
                    self.path.unlink(missing_ok=True)
                os.close(fd)
                if e.errno not in UNSUPPORTED_ERRNOS:
                    raise
                raise LockError(
                    f"cannot lock {self.path}: the file system of {self.folder} does not support flock ({e.strerror}). "
                    "Use an output folder on a local disk, NFSv4, or Lustre mounted with -o flock") from None
            if self._names(fd):
                self._fd = fd
                _HELD.add(fd)
            else:  # its previous holder removed it after this run opened it: lock the file the path names now
                os.close(fd)
        try:
            self._write_owner()
        except BaseException:
            self.release()
            raise
        files.remove_stale_temporaries(self.folder)
        return self

    def _open(self) -> int:
        """The lock file, opened for writing (created if missing, never truncated: a holder's details stay)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            full = files.disk_full_error(e, self.path, keeps_previous=False)
            if full is not None:
                raise full from None
            raise LockError(f"cannot open the lock file {self.path}: {e.strerror or e}") from None

    def _names(self, fd: int) -> bool:
        """Whether the lock's path still names the file open as `fd`."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)

    def _holder(self) -> Dict[str, Any]:
        """The holder's details, waiting up to OWNER_WAIT_S for a holder that is writing them right now."""
        deadline = time.monotonic() + OWNER_WAIT_S
        while True:
            owner = self.read_owner() or {}
            if "pid" in owner or time.monotonic() > deadline:
                return owner
            time.sleep(0.05)

    def _write_owner(self) -> None:
        """Replace the file's content by this run's details, flushed to disk (a full disk shows here)."""
        data = (json.dumps(self.owner) + "\n").encode()
        try:
            os.ftruncate(self._fd, 0)
            with os.fdopen(self._fd, "wb", closefd=False) as f:
                f.write(data)
                files.flush_to_disk(f)
        except OSError as e:
            full = files.disk_full_error(e, self.path, len(data), keeps_previous=False)
            if full is not None:
                raise full from None
            raise

    def release(self) -> None:
        """Remove the lock file (when it is still this lock's), then unlock it; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None or self.owner["pid"] != os.getpid():  # in a forked child the file was closed at the fork
            return
        _HELD.discard(fd)
        try:
            if self._names(fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # the last descriptor of the locked file: the lock goes with it


@contextmanager
def hold(folder, enabled: bool = True) -> Iterator[Optional[OutputLock]]:
    """The lock of `folder` while the block runs; the folder is created and checked writable first.

    Not `enabled` (ranks other than 0): no lock, only the folder's check (a CheckpointError, one line).
    """
    if not enabled:
        check_writable(folder)
        yield None
        return
    lock = OutputLock(folder).acquire()
    try:
        yield lock
    finally:
        lock.release()
