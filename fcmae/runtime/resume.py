"""Resuming a run: which checkpoint, whether it fits, which changed settings stop, and what an allowed change does.

`resume_checkpoint` picks the checkpoint (rank 0 decides for every rank) and
reads it; `check_same_model` stops unless it is a training checkpoint of the
same command and model (fcmae.runtime.command.TrainSpec names the model's
settings); `check_resume` compares the other settings and the plan.

Each command lists the settings whose change is harmless (where output
goes, how often it prints or saves, loader workers, threads, the device and
its precision, the path of the data); every other setting changes the meaning
of the run (batch sizes, input size, epochs and warmup, lr / blr / min_lr,
mask ratio, seed, augmentation, optimizer settings, ...), and so does a
different number of training images. A resume with such a change stops with
one line naming the changes and the two ways out:

- `--resume none` with a new `--output_dir`: a new run with the new settings;
- `--allow_config_change`: this run goes on under the new settings.

What an allowed change does (`align_state`): the finished epochs stay
finished; within the current epoch the position is carried over as the number
of images already seen, rounded down to an optimizer step of the new plan
(images since the last step are seen again); the optimizer step counter
becomes that position's step in the new plan (epoch x steps per epoch + steps
into the epoch). From there the lr follows the new plan's schedule, and the
run ends after exactly the new plan's `total_steps` optimizer steps, the last
at the schedule's last lr (above min_lr), never beyond it. Settings that
define the model's parameters cannot change at all (each command checks them
first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime import distributed
from fcmae.runtime.errors import CheckpointError, ConfigChangeError, PlanError, UsageError
from fcmae.runtime.logs import log
from fcmae.runtime.plan import Plan, make_plan


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (plain types only)."""

    epoch: int = 0  # current epoch (0-based)
    iteration: int = 0  # next iteration to run within the epoch
    step: int = 0  # optimizer steps done in the whole run
    epoch_loss_sum: float = 0.0  # running sum of this process's losses this epoch
    epoch_loss_count: int = 0
    history: list = field(default_factory=list)  # per-epoch summaries

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


# Harmless in both commands: where output goes, how often it prints or saves, workers, device, precision, the
# path of the data (a moved copy; a different number of images is caught by the plan), this flag itself, how
# the device computes (torch.compile, TF32; fcmae.runtime.device), restarts and the hang watchdog.
HARMLESS = ("output_dir", "log_dir", "resume", "dry_run", "world_size", "exit_after_steps", "num_workers",
            "print_every", "save_every", "keep_checkpoints", "device", "amp", "data_path", "cpu_threads",
            "allow_config_change", "compile", "compile_backend", "compile_mode", "tf32", "save_minutes",
            "max_restarts", "hang_minutes")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def model_changes(saved: Mapping[str, Any], current: Mapping[str, Any], model_keys: Sequence[str]) -> List[str]:
    """The settings among `model_keys` (they define the model's parameters) that differ, as readable lines."""
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in model_keys
            if _plain(saved.get(k)) != _plain(current.get(k))]


def meaningful_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                       harmless: Sequence[str]) -> "tuple[List[str], List[str]]":
    """(changes that matter, harmless changes) as `key: old -> new` lines; the plan entry is left out."""
    keys = [k for k in current if k != "plan"] + [k for k in saved if k not in current and k != "plan"]
    matter, benign = [], []
    for key in keys:
        old, new = _plain(saved.get(key)), _plain(current.get(key))
        if old != new:
            (benign if key in harmless else matter).append(f"{key} {old!r} -> {new!r}")
    return matter, benign


def saved_plan(saved: Mapping[str, Any], num_images: int) -> Optional[Dict[str, Any]]:
    """The plan the checkpoint was trained under: stored with it, else recomputed from its settings."""
    config = saved.get("config") or {}
    if isinstance(config.get("plan"), Mapping) and config["plan"].get("iters_per_epoch"):
        return dict(config["plan"])
    try:
        plan = make_plan(SimpleNamespace(**config), int(saved.get("world_size") or 1), num_images)
    except (PlanError, TypeError, AttributeError):
        return None
    return plan.to_dict()


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], plan: Plan, path, harmless: Sequence[str],
                 allow: bool) -> Optional[Dict[str, Any]]:
    """Stop (ConfigChangeError) on a change that matters unless `allow`; returns the saved run's plan.

    Args:
        saved: the checkpoint (its "config" is compared).
        current: this run's settings as plain types.
        plan: this run's plan (with the data set's size).
        path: the checkpoint's path, for messages.
        harmless: the command's settings whose change is taken as given.
        allow: --allow_config_change.
    """
    old_plan = saved_plan(saved, plan.num_images)
    matter, benign = meaningful_changes(saved.get("config") or {}, current, harmless)
    if old_plan is not None and old_plan.get("num_images") not in (None, plan.num_images):
        matter.append(f"number of training images {old_plan['num_images']} -> {plan.num_images}")
    if matter and not allow:
        raise ConfigChangeError(
            f"cannot resume {path}: these settings change the meaning of the run: {'; '.join(matter)}. Start a new "
            "run with --resume none and a new --output_dir, or continue this one under the new settings with "
            "--allow_config_change (the schedule is recomputed from the current position)")
    if matter:
        log(f"note: --allow_config_change: resuming under changed settings: {'; '.join(matter)}")
    if benign:
        log(f"note: resuming with changed settings taken as given: {'; '.join(benign)}")
    return old_plan


def align_state(state, old_plan: Optional[Mapping[str, Any]], plan: Plan) -> None:
    """Carry the run's position over to `plan` (see the module docstring); `state` is a RunState."""
    if state.epoch >= plan.epochs:
        return  # nothing left to train
    old_images_per_iter = old_plan["batch_size"] * old_plan["world_size"] if old_plan else plan.images_per_iter
    iteration = min(state.iteration * old_images_per_iter // plan.images_per_iter, plan.iters_per_epoch)
    iteration -= iteration % plan.update_freq
    step = state.epoch * plan.steps_per_epoch + iteration // plan.update_freq
    if (iteration, step) != (state.iteration, state.step):
        log(f"note: position carried over to the new plan: epoch {state.epoch + 1}, iteration {state.iteration} "
            f"-> {iteration}, optimizer step {state.step} -> {step} of {plan.total_steps}")
        state.iteration, state.step = iteration, step


def is_training_checkpoint(saved: Mapping[str, Any]) -> bool:
    """True for a checkpoint that a Trainer wrote (model, config and run state)."""
    return all(key in saved for key in ("model", "config", "run_state"))


def check_same_model(saved: Dict[str, Any], current: Mapping[str, Any], path, spec) -> None:
    """UsageError unless `saved` is a training checkpoint of `spec`'s command with this run's model.

    Fills in `saved["config"]` the settings of checkpoints older than them (`spec.old_defaults`).

    Args:
        saved: the checkpoint read (its config is completed in place).
        current: this run's settings as plain types.
        path: the checkpoint's path, for messages.
        spec: the command's TrainSpec (model_keys, old_defaults, checkpoint_kind, is_own_checkpoint).
    """
    if not spec.is_own_checkpoint(saved):
        raise UsageError(f"{path} is not {spec.checkpoint_kind} of this project (keys: "
                         f"{', '.join(sorted(map(str, saved))) or 'none'}); to start afresh pass --resume none")
    saved["config"] = {**spec.old_defaults, **saved["config"]}
    diffs = model_changes(saved["config"], current, spec.model_keys)
    if diffs:
        raise UsageError(f"cannot use {path}: it was trained with another model ({'; '.join(diffs)}). "
                         "Use another --output_dir, or --resume none to start afresh")


def read_checkpoint(path) -> Dict[str, Any]:
    """A checkpoint dict; a UsageError for a missing, truncated or foreign file."""
    try:
        return ckpt.load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"{e}. Remove it, or pass --resume none to start afresh") from None


def resume_checkpoint(resume: Optional[str], output_dir) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, contents) of the checkpoint to resume, the same on every rank; (None, None) to start afresh.

    Rank 0 decides (`--resume`: auto, a path or none; see
    fcmae.runtime.checkpoint.find_resume) and sends the path to the others,
    so a node-local output folder or a stale listing on a network file system
    cannot make ranks resume different files. When any rank cannot read the
    file, every rank stops with that rank's message.
    """

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
