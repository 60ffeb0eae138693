"""Typed run configs: one frozen dataclass per command, built once from the resolved settings.

A command resolves its YAML files and flags into a dict (fcmae.runtime.config),
then `build_config(PretrainConfig, values)` turns that dict into a frozen
dataclass: every value is converted to the field's type (YAML's `1e-4` read as
a string, `auto`/`none` words, lists to tuples) and range-checked from the
field's `setting(...)` metadata; `validate()` then checks what involves
several settings. After that the config is read by attribute and never
changed; `to_dict()` gives plain types for config.yaml and checkpoints.

`TrainConfig` holds the settings both commands share; fcmae.pretrain.config's
PretrainConfig and finetune.config's FinetuneConfig extend it. Defaults
live in configs/<command>/defaults.yaml only, so fields have none here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, TypeVar

from fcmae.runtime.config import parse_value, unknown_key_error
from fcmae.runtime.device import COMPILE_MODES
from fcmae.runtime.errors import ConfigError

AMP_MODES = ("bf16", "fp16", "off")
C = TypeVar("C", bound="TrainConfig")


def setting(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
            high_open: bool = False, choices: Optional[Tuple[str, ...]] = None,
            parse: Optional[Callable[[Any], Any]] = None) -> Any:
    """A config field with checks.

    Args:
        low, high: the allowed range of a number (None: unbounded).
        low_open, high_open: exclude the bound itself.
        choices: the allowed values of a string.
        parse: applied to the raw value first (e.g. to read words such as `auto`).
    """
    return field(metadata={"low": low, "high": high, "low_open": low_open, "high_open": high_open,
                           "choices": choices, "parse": parse})


_NO_CHECKS = setting().metadata  # what a field declared without setting() gets


# ---------------------------------------------------------------- value parsers (used during resolution)
def parse_amp(value: Any) -> str:
    """bf16 | fp16 | off; false and none mean off."""
    amp = "off" if value in (False, None) else str(value).lower()
    if amp not in AMP_MODES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {value!r}")
    return amp


def parse_auto(value: Any) -> Any:
    """`auto` (or null) -> None, which the plan reads as 'choose for me'."""
    return None if value is None or (isinstance(value, str) and value.lower() == "auto") else value


def parse_optional_path(value: Any) -> Optional[str]:
    """A path, or None for none / '' / false; numbers are folder names ('2024'), not numbers."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None
    return str(value)


# ---------------------------------------------------------------- conversion
def _range_text(meta: Mapping[str, Any]) -> str:
    low, high = meta["low"], meta["high"]
    left = "(" if meta["low_open"] or low is None else "["
    right = ")" if meta["high_open"] or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _in_range(value: float, meta: Mapping[str, Any]) -> bool:
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        return False
    return high is None or (value < high if meta["high_open"] else value <= high)


def _convert(name: str, hint: Any, value: Any, meta: Mapping[str, Any]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X], or a union such as Optional[Union[str, Tuple[float, ...]]]
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first type the value converts to; the last one's error otherwise
            try:
                return _convert(name, option, value, meta)
            except ConfigError:
                pass
        hint = options[-1]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            count = "a list" if args[-1] is Ellipsis else f"a list of {len(args)}"
            raise ConfigError(f"{name} must be {count} of {args[0].__name__}s, got {value!r}")
        return tuple(_convert(f"{name}[{i}]", args[0], v, meta) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        value = str(value)
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        return value
    if hint in (int, float) and isinstance(value, str):
        value = parse_value(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, meta):
            bound = f" >= {meta['low']}" if meta["low"] is not None and meta["high"] is None else (
                f" in {_range_text(meta)}" if meta["high"] is not None else "")
            raise ConfigError(f"{name} must be an integer{bound}, got {value!r}")
        return value
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not _in_range(value, meta):
            raise ConfigError(f"{name} must be a number in {_range_text(meta)}, got {value!r}")
        return float(value)
    raise TypeError(f"config field {name}: unsupported type {hint!r}")  # a programming error


def build_config(cls: Type[C], values: Mapping[str, Any]) -> C:
    """The frozen, validated `cls` from a resolved settings dict; ConfigError names the first bad setting."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise unknown_key_error(unknown[0], names, as_flag=False)
    missing = sorted(names - set(values))
    if missing:
        raise ConfigError(f"setting {missing[0]!r} is missing (it belongs in the command's defaults.yaml)")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        meta = {**_NO_CHECKS, **f.metadata}
        raw = values[f.name]
        kwargs[f.name] = _convert(f.name, hints[f.name], meta["parse"](raw) if meta["parse"] else raw, meta)
    return cls(**kwargs)


# ---------------------------------------------------------------- the shared settings
@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run that both commands share (see configs/*/defaults.yaml for each)."""

    size: str
    depths: Optional[Tuple[int, ...]] = setting(1)
    dims: Optional[Tuple[int, ...]] = setting(1)
    drop_path: float = setting(0.0, 1.0, high_open=True)
    input_size: int = setting(1)
    data_path: Optional[str] = setting(parse=parse_optional_path)
    train_num_samples: Optional[int] = setting(1)  # samples in the training shards, when no _info.json gives them
    shuffle_buffer: int = setting(1)  # shards: the samples shuffled together (fcmae.data.shard_stream)
    num_workers: int = setting(0)
    epochs: int = setting(1)
    warmup_epochs: int = setting(0)
    batch_size: int = setting(1)
    effective_batch: int = setting(1)
    update_freq: Optional[int] = setting(1, parse=parse_auto)  # None = auto
    blr: float = setting(0.0, low_open=True)
    lr: Optional[float] = setting(0.0, low_open=True)
    min_lr: float = setting(0.0)
    weight_decay: float = setting(0.0)
    betas: Tuple[float, float] = setting(0.0, 1.0, high_open=True)
    clip_grad: Optional[float] = setting(0.0, low_open=True)
    amp: str = setting(parse=parse_amp)
    device: str
    # GPU
    compile: Optional[bool] = setting(parse=parse_auto)  # None = auto: on CUDA only (fcmae.runtime.device)
    compile_backend: str
    compile_mode: str = setting(choices=COMPILE_MODES)  # whole | regional | cudagraphs (fcmae.runtime.device)
    tf32: bool
    seed: int
    output_dir: str
    log_dir: str
    resume: Optional[str] = setting(parse=parse_optional_path)  # 'auto', a path, or None
    allow_config_change: bool  # resume although settings that change the run differ (fcmae.runtime.resume)
    print_every: int = setting(1)
    save_every: int = setting(0)
    save_minutes: Optional[float] = setting(0.0, low_open=True)  # timed mid-epoch checkpoints; None = off
    keep_checkpoints: int = setting(0)
    max_restarts: int = setting(0)  # the launcher restarts a failed run this many times (fcmae.runtime.launch)
    hang_minutes: Optional[float] = setting(0.0, low_open=True)  # the hang watchdog; None = off
    world_size: Optional[int] = setting(1)
    dry_run: bool
    exit_after_steps: Optional[int] = setting(1)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks across settings (each field's own checks ran in build_config)."""
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")

    def to_dict(self) -> Dict[str, Any]:
        """Plain types (tuples as lists), for config.yaml and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self: C, **changes: Any) -> C:
        """A new, validated config with `changes` (this one stays as it is)."""
        return dataclasses.replace(self, **changes)
