"""Every exception of the runtime, each with the exit code a command leaves with when it stops on it.

A command prints an expected error as one line `NAME: error: MESSAGE` and
exits with the class's `exit_code` (fcmae.runtime.command.run_cli): 2 bad
input, 3 a non-finite loss, 4 a full disk, 5 an output folder in use by
another run (or on a file system that cannot lock it), 6 no optimizer step
within `hang_minutes` (the hang watchdog), 7 lost contact with another rank.
The launcher restarts a run (`max_restarts`) after any failure but 2 to 5,
which would only fail again (fcmae.runtime.launch.launcher). Anything else
is a bug and keeps its traceback. The base classes (ValueError, RuntimeError,
OSError) stay, so `except ValueError` and the like still catch them. The
domain errors of the layers above (fcmae.data, fcmae.weights,
fcmae.pretrain) live there and carry `exit_code = 2` the same way.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input found before any compute; printed without a traceback."""

    exit_code = 2


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says why."""

    exit_code = 2


class PlanError(ConfigError):
    """Settings that cannot be planned for this world size or data set; the message names what to change."""

    exit_code = 2


class ConfigChangeError(UsageError):
    """A resume with settings that change the meaning of the run (and no --allow_config_change)."""

    exit_code = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; the message says why."""

    exit_code = 2


class DeviceError(RuntimeError):
    """The requested device is not there (e.g. --device cuda without a GPU); a one-line error."""

    exit_code = 2


class LaunchError(ValueError):
    """An environment the launcher cannot start from; the message says what to set."""

    exit_code = 2


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""

    exit_code = 3


class DiskFullError(OSError):
    """No space (or quota) left while writing a file; the message says where and how much."""

    exit_code = 4

    def __str__(self) -> str:  # the message alone, also when built from the message only (agreed on by the ranks)
        return str(self.strerror) if self.strerror is not None else super().__str__()


class LockError(RuntimeError):
    """The output folder is in use by another run (the message names it), or cannot be locked at all."""

    exit_code = 5


class HangError(RuntimeError):
    """No optimizer step completed within `hang_minutes`; every rank's Python stacks are in the output folder."""

    exit_code = 6


class LostContactError(RuntimeError):
    """Another rank stopped answering (its process died, or its node or the network failed)."""

    exit_code = 7


# Exit codes of failures that a restart would only meet again: bad input, a non-finite loss, a full disk, a
# folder in use. Every other failure (a killed or crashed rank, a hang, lost contact) may be restarted.
FINAL_EXIT_CODES = (UsageError.exit_code, NonFiniteLossError.exit_code, DiskFullError.exit_code, LockError.exit_code)
