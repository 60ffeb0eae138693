"""One training run per output folder: a lock file, taken by rank 0 before the run writes anything.

`OUTPUT/.fcmae.lock` is created with O_CREAT | O_EXCL (atomic on local file
systems and on NFS v3 and later, where flock() may be unsupported or local to
one client) and holds one line of JSON: host, pid, the process's start time
and the command line. While the run lives, a daemon thread touches the file
every `HEARTBEAT_S` seconds. The lock is released (the file removed) when
the run ends, also by an exception or a stop signal.

A run that finds the file stops with one line naming the running one, unless
the lock is stale:
- on this host: its process is gone (or the pid now belongs to a process
  started later);
- from another host (whose processes cannot be checked): the file was not
  touched for `STALE_AFTER_S` seconds. This rests on the hosts' clocks (and
  the file server's) agreeing to within minutes.
A stale lock is taken over (two runs taking over the same stale lock in the
same instant may both succeed: the take-over is an unlink, then a create).
Then the project's temporaries of killed writes in the folder are removed
(fcmae.runtime.files.remove_stale_temporaries).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from fcmae.runtime.checkpoint import check_writable
from fcmae.runtime.errors import LockError
from fcmae.runtime.files import host_name, pid_alive, remove_stale_temporaries

LOCK_NAME = ".fcmae.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _start_time(pid: int) -> Optional[str]:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def _describe(owner: Dict[str, Any]) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started', '?')}: " \
           f"{owner.get('command', '?')}"


class OutputLock:
    """The lock of one output folder.

    Args:
        folder: the output folder (created if needed).
        heartbeat_s: how often the lock file is touched while held.
    """

    def __init__(self, folder, heartbeat_s: float = HEARTBEAT_S):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.owner = {"host": host_name(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}

    def read_owner(self) -> Optional[Dict[str, Any]]:
        """The holder as recorded in the lock file; None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def is_stale(self, owner: Dict[str, Any]) -> bool:
        """Whether the recorded holder is gone (see the module docstring for the rule)."""
        if owner.get("host") == host_name() and isinstance(owner.get("pid"), int):
            pid = owner["pid"]
            if pid == os.getpid():
                return False  # this process holds it (a second run in-process is refused, too)
            if not pid_alive(pid):
                return True
            started = _start_time(pid)
            return started is not None and owner.get("start") is not None and started != owner["start"]
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > STALE_AFTER_S

    def acquire(self) -> "OutputLock":
        """Take the lock or raise LockError naming the holder; removes stale temporaries once held.

        An output folder that cannot be created or written is a CheckpointError (a one-line error).
        """
        check_writable(self.folder)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self.read_owner()
                if owner is None:
                    continue  # released meanwhile
                if owner and not self.is_stale(owner):
                    raise LockError(
                        f"{self.folder} is in use by another run ({_describe(owner)}); wait for it to end, "
                        f"or use another --output_dir. If that run is gone, remove {self.path}") from None
                if not owner and time.time() - self.path.stat().st_mtime < 5:
                    time.sleep(1)  # another run is writing its lock file right now
                    continue
                self.path.unlink(missing_ok=True)  # stale: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.owner) + "\n")
            break
        else:
            raise LockError(f"could not take the lock {self.path} (other runs keep taking it); try again")
        self._thread = threading.Thread(target=self._beat, name="fcmae-lock-heartbeat", daemon=True)
        self._thread.start()
        remove_stale_temporaries(self.folder)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        owner = self.read_owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == host_name():
            self.path.unlink(missing_ok=True)


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
