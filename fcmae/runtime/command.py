"""The scaffold of every command-line tool: its command line, its errors, its dry run; TrainSpec.

`run_cli(name, body, expected)` runs a tool's body; an expected error is
printed as one line `NAME: error: MESSAGE` and the tool exits with the
error's `exit_code` (fcmae.runtime.errors: 2 bad input, 3 non-finite loss,
4 full disk, 5 output folder in use); anything else is a bug and keeps its
traceback. A Ctrl-C that reaches the body as KeyboardInterrupt is one line
too (`NAME: interrupted: ...`, exit 130). Every tool goes through it: the
training commands (through `TrainSpec.main`), fcmae-convert, fcmae-knn,
fcmae-linprobe, bench_data and the launcher.

A training command declares itself in one `TrainSpec` (fcmae.pretrain.main
and finetune.main_finetune define `SPEC`): `main` reads the command line
into the typed config, prints the plan and stops for `--dry_run`, or runs
`train` under the output folder's lock. The launcher
(fcmae.runtime.launch.launcher) uses the same `resolve` and `describe`, so
the launcher and the command read the flags alike.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence, Tuple

from fcmae.runtime import distributed, lock, output_folder, resume, watchdog
from fcmae.runtime.device import run_process
from fcmae.runtime.distributed import is_dist
from fcmae.runtime.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    DiskFullError,
    LockError,
    LostContactError,
    NonFiniteLossError,
    UsageError,
)
from fcmae.runtime.files import disk_full_error
from fcmae.runtime.signals import INTERRUPTED_EXIT_CODE, STOP


def fail(name: str, error: BaseException) -> NoReturn:
    """Print `NAME: error: MESSAGE` on stderr and exit with the error's class's `exit_code`."""

    print(f"{name}: error: {error}", file=sys.stderr, flush=True)
    _leave(error.exit_code)


def _leave(code: int) -> NoReturn:
    """Exit with `code`; at once when a process group is still up (see below)."""
    if is_dist():
        # The error (or Ctrl-C) left the process group up (distributed.cleanup: destroying it while the peers close
        # races them). Python's own exit would tear it down and gloo can abort there (SIGABRT, "terminate
        # called without an active exception") instead of exiting with `code`. Every file is written and
        # every lock released by now (their blocks have unwound), so leave at once.
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def run_cli(name: str, body: Callable[[], int], expected: Tuple[type, ...],
            interrupted: str = "stopped at once; nothing was saved") -> NoReturn:
    """Exit with the code `body()` returns; an `expected` error becomes one line and its `exit_code` (`fail`).

    With DiskFullError among `expected`, an OSError of a full disk outside write_atomic (log.jsonl's
    appends) is turned into one too (exit 4). A Ctrl-C (KeyboardInterrupt) prints `NAME: interrupted:
    INTERRUPTED` (on rank 0) and exits 130. Any other exception keeps its traceback.
    """

    try:
        code = body()
    except expected as e:
        fail(name, e)
    except KeyboardInterrupt:
        if distributed.get_rank() == 0:
            print(f"{name}: interrupted: {interrupted}", file=sys.stderr, flush=True)
        _leave(INTERRUPTED_EXIT_CODE)
    except OSError as e:
        full = disk_full_error(e, e.filename or "?") if DiskFullError in expected else None
        if full is None:
            raise
        fail(name, full)
    sys.exit(code)


def _interrupted_exit_code() -> int:
    """The exit code of a training process that saved after a Ctrl-C: 130, but 0 in a rank that torchrun started.

    torchrun takes a rank's non-zero code for a failure: it would SIGTERM the other ranks and log an error for
    each. Under the launcher (fcmae.runtime.launch.launcher.Supervisor) the launcher then exits 130 itself.
    """
    return 0 if os.environ.get("TORCHELASTIC_RUN_ID") else INTERRUPTED_EXIT_CODE


@dataclass(frozen=True)
class TrainSpec:
    """What a training command declares; the runtime does the rest (compare torchtitan's TrainSpec).

    Each training command fills in one (`SPEC` in fcmae.pretrain.main and
    finetune.main_finetune). The runtime reads the command line into
    `config_class` (`resolve`), prints the plan for `--dry_run` and the
    launcher (`describe`), holds the output folder's lock and the process
    group around `train` (or `evaluate` for `--eval`), checks a resumed
    checkpoint against `model_keys` and the settings that may change
    (fcmae.runtime.resume), and turns expected errors into one line and an
    exit code.

    Args:
        name: the name in messages (`fcmae-pretrain`).
        config_class: the command's typed, frozen config (a fcmae.runtime.settings.TrainConfig).
        resolve: argv -> the validated config (argv None: sys.argv).
        describe: (config, world size) -> the plan as text, reading no data and building nothing.
        train: (config, this process's DistInfo) -> exit code: build the data, model and optimizer, then
            fit with the command's step function and end-of-epoch.
        model_keys: settings that define the model's parameters; a resumed checkpoint must share them.
        harmless: the command's settings, besides the runtime's own (resume.HARMLESS), whose change on
            resume is taken as given.
        old_defaults: values of settings that checkpoints written before those settings existed were
            trained with.
        checkpoint_kind: what the command's checkpoints are, for messages ("an FCMAE pre-training checkpoint").
        is_own_checkpoint: checkpoint dict -> True when it is one of this command's training checkpoints.
        evaluate: (config, DistInfo) -> exit code of an evaluation-only run (`--eval`; it checks the folder it
            writes to), or None.
        expected_errors: the command's own exception types that mean bad input (each with an `exit_code`).
    """

    name: str
    config_class: type
    resolve: Callable[[Optional[Sequence[str]]], Any]
    describe: Callable[[Any, int], str]
    train: Callable[[Any, distributed.DistInfo], int]
    model_keys: Tuple[str, ...]
    harmless: Tuple[str, ...] = ()
    old_defaults: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_kind: str = "a training checkpoint"
    is_own_checkpoint: Callable[[Mapping[str, Any]], bool] = resume.is_training_checkpoint
    evaluate: Optional[Callable[[Any, distributed.DistInfo], int]] = None
    expected_errors: Tuple[type, ...] = ()

    @property
    def harmless_on_resume(self) -> Tuple[str, ...]:
        return resume.HARMLESS + tuple(self.harmless)

    def run(self, cfg) -> int:
        """A real run on the processes this one belongs to: evaluation (`--eval`), or training under the lock.

        An output folder this run creates is removed again when the run stops before it wrote anything to keep
        (fcmae.runtime.output_folder). A collective that fails because another rank is gone (killed, crashed,
        its node lost: distributed.lost_contact) becomes a LostContactError, one line and exit 7, instead of the
        transport's traceback; the launcher names the rank that failed first.
        """
        try:
            return self._run(cfg)
        except Exception as e:
            if watchdog.FIRED.is_set():  # the hang watchdog has said why and ends the process (exit 6)
                watchdog.wait_for_exit()
            reason = distributed.lost_contact(e) if is_dist() else None
            if reason is None:
                raise
            raise LostContactError(f"rank {distributed.get_rank()}: lost contact with another rank ({reason}); "
                                   "stopping") from None

    def _run(self, cfg) -> int:
        created = output_folder.first_missing(cfg.output_dir)  # before any process makes it
        with run_process(cfg) as info, output_folder.removed_on_failure(created, enabled=info.is_main):
            if self.evaluate is not None and getattr(cfg, "eval", False):
                # no lock (a training run may hold it); `evaluate` checks the folder its results go to
                return self.evaluate(cfg, info)
            with ExitStack() as held:
                error = None
                try:
                    held.enter_context(lock.hold(cfg.output_dir, enabled=info.is_main))  # before anything is written
                except (LockError, CheckpointError, DiskFullError) as e:
                    error = e
                distributed.raise_first_error(error)  # one rank's failure here stops every rank, not only its own
                return self.train(cfg, info)

    def usage_errors(self) -> Tuple[type, ...]:
        """The errors that mean bad input (exit 2); the launcher stops on them too."""
        return (UsageError, ConfigError, CheckpointError, DeviceError) + self.expected_errors

    def fail(self, error: BaseException) -> NoReturn:
        fail(self.name, error)

    def main(self, argv: Optional[Sequence[str]] = None) -> NoReturn:
        """Resolve, then print the plan (`--dry_run`) or run; expected errors become one line and an exit code.

        The process's stop request (fcmae.runtime.signals.STOP) is installed for the run (kept when the
        command installed it before its imports): a run stopped by a Ctrl-C has saved and exits 130.
        """

        def body() -> int:
            cfg = self.resolve(argv)
            if cfg.dry_run:
                print(self.describe(cfg, cfg.world_size or 1))
                print("dry run: nothing was trained", flush=True)
                sys.exit(0)
            code = self.run(cfg)
            return _interrupted_exit_code() if code == 0 and STOP.interrupted else code

        installed_here = not STOP.installed
        STOP.install()
        try:
            run_cli(self.name, body,
                    self.usage_errors() + (NonFiniteLossError, LockError, DiskFullError, LostContactError),
                    interrupted="stopped at once, without saving; the checkpoints written before are kept")
        finally:
            if installed_here:  # called in-process (tests, notebooks): Python's own Ctrl-C comes back
                STOP.restore()
