"""Processes that end with the process that started them: no training process or loader worker outlives its launcher.

torchrun starts every rank in a session of its own, so a signal to the
launcher's process group (a SIGKILL of the job's shell, `kill -9 -PGID`) does
not reach the ranks: they would go on training as orphans, holding the output
folder and the GPUs. Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`)
closes that gap: the kernel sends SIGKILL to a process the moment its parent
ends, however the parent ends. The chain, each link set up by the process
that is started:

- torchrun, started by the launcher (fcmae.runtime.launch.launcher), ends with it;
- each rank, started by torchrun (or by the launcher's restart loop), ends
  with its parent: the command calls `die_with_launcher()` first thing, which
  reads the parent's pid from FCMAE_PARENT_PID (set only by the launcher and
  by fcmae.runtime.launch.torchrun). A command started by hand (a shell,
  nohup, srun) has no such variable and stays as it is: the end of an
  interactive shell must not kill a run started with nohup;
- each loader worker ends with its rank (`loader_worker_init`, the loaders'
  worker_init_fn; it also ignores the stop signals, see
  fcmae.runtime.signals.ignore_stop_signals). Because workers ignore
  SIGTERM, which is how Python's multiprocessing ends its daemonic children
  at exit, a process that exits while a loader's iterator is still alive
  (an error raised out of the loop keeps it referenced) would wait for them
  forever: `end_loader_workers_at_exit` kills them first.

The signal goes when the parent *thread* that started the process ends; the
launcher, torchrun and the ranks start their children from their main
thread. Elsewhere than Linux these calls do nothing. This module imports
nothing heavy (the commands call it before importing torch).
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Mapping, Optional

from fcmae.runtime.signals import ignore_stop_signals

PARENT_VARIABLE = "FCMAE_PARENT_PID"  # the pid a started training process ends with
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
_EXIT_HOOK_SET = False


def _prctl(option: int, value: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def die_with_parent(parent: Optional[int] = None, signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send `signum` to this process when its parent ends; False where it cannot (not Linux).

    Args:
        parent: the pid the parent should have (default: the current parent). If the parent ended before the
            request was in place (this process now belongs to init or a subreaper), `signum` comes at once.
        signum: the signal to get.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if parent is None else parent
    if _prctl(PR_SET_PDEATHSIG, int(signum)) != 0:
        return False
    if os.getppid() != parent:  # too late: the parent is gone already
        os.kill(os.getpid(), signum)
    return True


def parent_death_signal() -> int:
    """The signal this process gets when its parent ends (0: none); 0 where this cannot be read (not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    value = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        return 0
    return value.value


def die_with_launcher(env: Optional[Mapping[str, str]] = None) -> bool:
    """In a training process started by the launcher or torchrun (FCMAE_PARENT_PID): end when that parent ends.

    Returns whether the request was made (False without the variable, or not on Linux).
    """
    env = os.environ if env is None else env
    value = env.get(PARENT_VARIABLE, "")
    if not value.isdigit():
        return False
    return die_with_parent(int(value))


def loader_worker_init(worker_id: int = 0) -> None:
    """A DataLoader worker's set-up (its `worker_init_fn`): ignore the stop signals, end with the training process."""
    ignore_stop_signals(worker_id)
    die_with_parent()


def _kill_daemonic_children() -> None:
    workers = [child for child in multiprocessing.active_children() if child.daemon]  # torch starts them daemonic
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a worker failure
        for child in workers:
            child.kill()
            child.join(timeout=10)


def end_loader_workers_at_exit() -> None:
    """In a process that starts loaders: at its exit, SIGKILL the loader workers still running (see the module
    docstring). Runs before multiprocessing's own exit handler, which would wait for them."""
    global _EXIT_HOOK_SET
    if not _EXIT_HOOK_SET:
        atexit.register(_kill_daemonic_children)  # atexit runs last-registered first
        _EXIT_HOOK_SET = True
