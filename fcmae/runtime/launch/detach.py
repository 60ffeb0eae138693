"""Run a command outside the caller's process tree and session, and report its pid and exit code.

    python -m fcmae.runtime.launch.detach FD COMMAND [args...]

Used by fcmae.runtime.launch.launcher for srun inside a SLURM batch job:
`scancel --signal=TERM --full` signals every process of the batch step, and
srun turns a SIGTERM of its own into a SIGKILL of the training (no
checkpoint). With `proctrack/linuxproc` a process that is neither a
descendant of the batch shell nor in its process group is not signalled
(measured, docs/fault-tolerance-and-slurm.md), so this module starts a new session, forks and
exits: the fork, reparented to init, runs COMMAND as its child. It writes
`pid N` and then `exit CODE` (128 + N when killed by signal N) to the pipe
FD, which the launcher reads. COMMAND still ends with the job: SLURM ends
srun when the job ends. Imports nothing heavy.
"""

import os
import subprocess
import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    fd, command = int(argv[0]), argv[1:]
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the launcher's child ends here; the fork below is reparented to init
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # no terminal to read from in a new session
    os.write(fd, f"pid {child.pid}\n".encode())
    code = child.wait()
    os.write(fd, f"exit {128 - code if code < 0 else code}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main()
