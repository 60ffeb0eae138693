"""The scaffold of a training command: its command line, its errors, its dry run.

Each command module (fcmae/main_pretrain.py, finetune/main_finetune.py)
defines `COMMAND = Command(name, resolve, run, describe)`; `Command.main`
then reads the command line into the typed config, prints the plan and stops
for `--dry_run`, or runs. Bad input (UsageError, ConfigError, and the
command's own expected errors, a device that is not there) is printed as one
line `NAME: error: ...` with exit code 2; a non-finite loss exits with 3, a
full disk with 4, an output folder in use by another run with 5; anything
else is a bug and keeps its traceback. fcmae.runtime.launch uses the same `resolve` and
`describe`, so the launcher and the command read the flags alike.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.config import (
    ConfigError, apply_overrides, load_config, normalise_reference_flags, parse_overrides, split_positionals,
)

EXIT_USAGE = 2
EXIT_NON_FINITE_LOSS = 3
EXIT_DISK_FULL = 4
EXIT_IN_USE = 5


class UsageError(ValueError):
    """Bad input found before any compute; printed without a traceback."""


@dataclass(frozen=True)
class Flags:
    """How a command's flags are read besides `--key value` (the reference release's names and forms).

    Args:
        aliases: other flag names -> config keys (`--model` -> size).
        boolean: flags that may stand alone (`--dry_run` means true).
        ignored: the reference's flags without meaning here, accepted and dropped.
        ignored_with_value: the same, for flags that take a value (`--dist_url env://`).
    """

    aliases: Dict[str, str]
    boolean: Tuple[str, ...]
    ignored: Tuple[str, ...] = ()
    ignored_with_value: Tuple[str, ...] = ()


def read_command_line(argv: Optional[Sequence[str]], doc: str, flags: Flags,
                      positionals: int) -> Tuple[List[str], Dict[str, Any], List[str]]:
    """(leading positional arguments, {dotted key: value} overrides, extra --config files); -h prints `doc`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        sys.exit(0)
    names, rest = split_positionals(argv, positionals)
    standalone = flags.boolean + flags.ignored
    overrides = parse_overrides(normalise_reference_flags(rest, standalone, flags.ignored_with_value),
                                flags.aliases, standalone)
    for key in flags.ignored + flags.ignored_with_value:
        overrides.pop(key, None)
    extra_files = overrides.pop("config", None) or []
    return names, overrides, [extra_files] if isinstance(extra_files, str) else list(extra_files)


def layered_settings(files: Sequence[Path], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """YAML files merged in order, then the command-line overrides (unknown keys are errors)."""
    return apply_overrides(load_config(files), overrides)


def check_size(name: Optional[str], usage: str) -> str:
    """The registry name of a model size; `usage` completes the error when none is given."""
    import sparse

    if name is None:
        raise UsageError(f"no model size given: {usage} (sizes: {', '.join(sparse.MODEL_SIZES)})")
    try:
        return sparse.check_size(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def read_checkpoint(path) -> Dict[str, Any]:
    """A checkpoint dict; a UsageError for a missing, truncated or foreign file."""
    try:
        return ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise UsageError(f"{e}. Remove it, or pass --resume none to start afresh") from None


def resume_checkpoint(resume: Optional[str], output_dir) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, contents) of the checkpoint to resume, the same on every rank; (None, None) to start afresh.

    Rank 0 decides (`--resume`: auto, a path or none; see
    fcmae.runtime.checkpoint.find_resume) and sends the path to the others,
    so a node-local output folder or a stale listing on a network file system
    cannot make ranks resume different files. When any rank cannot read the
    file, every rank stops with that rank's message.
    """
    from fcmae.runtime import distributed

    path = ckpt.find_resume(resume, output_dir) if distributed.get_rank() == 0 else None
    path = distributed.broadcast_object(path)
    if path is None:
        return None, None
    saved, error = None, None
    try:
        saved = read_checkpoint(path)
    except UsageError as e:
        error = e
    distributed.raise_first_error(error)
    return path, saved


@dataclass(frozen=True)
class Command:
    """A training command.

    Args:
        name: the name in messages (`fcmae-pretrain`).
        resolve: argv -> the validated, frozen config (argv None: sys.argv).
        run: config -> exit code of a real run.
        describe: (config, world size) -> the plan as text, reading no data and building nothing.
        expected_errors: the command's own exception types that mean bad input.
    """

    name: str
    resolve: Callable[[Optional[Sequence[str]]], Any]
    run: Callable[[Any], int]
    describe: Callable[[Any, int], str]
    expected_errors: Tuple[type, ...] = ()

    def usage_errors(self) -> Tuple[type, ...]:
        from fcmae.runtime.distributed import DeviceError

        return (UsageError, ConfigError, ckpt.CheckpointError, DeviceError) + self.expected_errors

    def fail(self, error: BaseException, code: int = EXIT_USAGE) -> NoReturn:
        print(f"{self.name}: error: {error}", file=sys.stderr, flush=True)
        from fcmae.runtime.distributed import is_dist

        if is_dist():
            # The error left the process group up (distributed.cleanup: destroying it while the peers close
            # races them). Python's own exit would tear it down and gloo can abort there (SIGABRT, "terminate
            # called without an active exception") instead of exiting with `code`. Every file is written and
            # every lock released by now (their blocks have unwound), so leave at once.
            sys.stdout.flush()
            os._exit(code)
        sys.exit(code)

    def main(self, argv: Optional[Sequence[str]] = None) -> NoReturn:
        """Resolve, then print the plan (`--dry_run`) or run; expected errors become one line and an exit code."""
        from fcmae.runtime.files import DiskFullError, disk_full_error
        from fcmae.runtime.lock import LockError
        from fcmae.runtime.trainer import NonFiniteLossError

        try:
            cfg = self.resolve(argv)
            if cfg.dry_run:
                print(self.describe(cfg, cfg.world_size or 1))
                print("dry run: nothing was trained", flush=True)
                sys.exit(0)
            code = self.run(cfg)
        except self.usage_errors() as e:
            self.fail(e)
        except NonFiniteLossError as e:
            self.fail(e, EXIT_NON_FINITE_LOSS)
        except LockError as e:
            self.fail(e, EXIT_IN_USE)
        except DiskFullError as e:
            self.fail(e, EXIT_DISK_FULL)
        except OSError as e:  # a write outside write_atomic (log.jsonl's appends) on a full disk
            full = disk_full_error(e, e.filename or "?")
            if full is None:
                raise
            self.fail(full, EXIT_DISK_FULL)
        sys.exit(code)
