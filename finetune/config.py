"""The fine-tuning command's typed config, resolved from configs/finetune/ and the command line.

Settings: configs/finetune/defaults.yaml < sizes/SIZE.yaml (the published or
derived recipe) < demo.yaml (with --demo) < --config FILE < command-line
flags; then `FinetuneConfig` (frozen) checks every value once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Set, Tuple

from fcmae.data.folder import MAX_IN_CHANS
from fcmae.data.image_io import LAYOUTS
from fcmae.data.stats import MeanStd, check_mean_std_setting, parse_mean_std
from fcmae.pretrain.config import check_arch, check_size
from fcmae.runtime.config import (
    Flags,
    config_root,
    default_output_dir,
    layered_settings,
    load_yaml,
    named_config,
    read_command_line,
)
from fcmae.runtime.errors import ConfigError
from fcmae.runtime.settings import TrainConfig, build_config, parse_optional_path, setting
from finetune.optim import LAYER_DECAY_TYPES

# The reference release's flag names -> config keys; its flags without meaning here (evaluation is always
# distributed and exact; pinning is automatic; ImageNet is just an image folder).
FLAGS = Flags(
    aliases={"model": "size", "nb_classes": "num_classes", "accum_iter": "update_freq", "save_ckpt_freq": "save_every"},
    boolean=("dry_run", "demo", "eval", "model_ema", "model_ema_eval", "use_amp", "allow_config_change", "compile",
             "drop_last"),
    ignored=("pin_mem", "no_pin_mem", "dist_eval", "dist_on_itp", "auto_resume", "disable_eval",
             "model_ema_force_cpu"),
    ignored_with_value=("data_set", "dist_url", "local_rank", "start_epoch"),
)


def parse_weights(value: Any) -> Optional[str]:
    """The pre-trained weights' path; none / scratch / '' -> None (train from scratch)."""
    path = parse_optional_path(value)
    return None if path is not None and path.lower() == "scratch" else path


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Every fine-tuning setting; each is described in configs/finetune/defaults.yaml."""

    recipe_source: Optional[str]
    finetune: Optional[str] = setting(parse=parse_weights)
    num_classes: Optional[int] = setting(1)
    head_init_scale: float = setting(0.0)
    crop_pct: float = setting(0.05, 1.0)
    demo: bool
    demo_crop_size: int = setting(1)
    demo_train_per_photo: int = setting(1)
    demo_val_per_photo: int = setting(1)
    max_bad_fraction: float = setting(0.0, 1.0, high_open=True)
    drop_last: bool  # false: each epoch trains on its last, partial batch too (fcmae.runtime.plan)
    aa: Optional[str]
    color_jitter: Optional[float] = setting(0.0)
    reprob: float = setting(0.0, 1.0)
    remode: str
    recount: int = setting(1)
    mixup: float = setting(0.0)
    cutmix: float = setting(0.0)
    cutmix_minmax: Optional[Tuple[float, float]] = setting(0.0, 1.0)
    mixup_prob: float = setting(0.0, 1.0)
    mixup_switch_prob: float = setting(0.0, 1.0)
    mixup_mode: str = setting(choices=("batch", "pair", "elem"))
    smoothing: float = setting(0.0, 1.0, high_open=True)
    model_ema: bool
    model_ema_decay: float = setting(0.0, 1.0, high_open=True)
    model_ema_eval: bool
    layer_decay: float = setting(1e-6, 1.0)
    layer_decay_type: str = setting(choices=LAYER_DECAY_TYPES)
    eval: bool
    cpu_threads: Optional[int] = setting(1)
    # data: channels, normalisation, .npy layout (decoding is on the CPU: timm's augmentation works on images there)
    in_chans: int = setting(1, MAX_IN_CHANS)
    mean: MeanStd = setting(parse=parse_mean_std)
    std: MeanStd = setting(parse=parse_mean_std)
    layout: str = setting(choices=LAYOUTS)
    # The settings the user chose (command line, --config files, demo.yaml), as opposed to the defaults'; a
    # checkpoint's stored values replace only the others (finetune.checkpoint_settings). Not saved.
    given: Tuple[str, ...]

    def validate(self) -> None:
        super().validate()
        check_arch(self)
        check_mean_std_setting(self.in_chans, self.mean, self.std)
        if self.finetune is not None and not Path(self.finetune).is_file():
            raise ConfigError(f"checkpoint not found: {self.finetune} (give an FCMAE checkpoint, a file written by "
                              "fcmae-convert, or `none` to train from scratch)")
        if not self.data_path and not self.demo:
            raise ConfigError("no data: give a folder with train/<class>/ and val/<class>/ with --data_path, or run "
                              "the built-in labelled demo with --demo")

    def to_dict(self) -> Dict[str, Any]:
        """TrainConfig's, without `given` (where a value came from is not a setting of the run)."""
        settings = super().to_dict()
        del settings["given"]
        return settings

    @property
    def mixes(self) -> bool:
        """Whether Mixup or CutMix is on (they need an even per-GPU batch)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


def finetune_config_dir() -> Path:
    return config_root() / "finetune"


def given_keys(overrides: Dict[str, Any], chosen_files: Sequence[Path]) -> Set[str]:
    """The settings set on the command line or in the files the user chose (demo.yaml, --config FILE)."""
    keys = set(overrides)
    for path in chosen_files:
        keys.update(load_yaml(path))
    return keys


def resolve_config(argv: Optional[Sequence[str]] = None, doc: str = __doc__) -> FinetuneConfig:
    """The command line (`SIZE [CHECKPOINT] [--key value ...]`, or the reference's flags) -> FinetuneConfig."""
    positionals, overrides, extra_files = read_command_line(argv, doc, FLAGS, 2)
    extra_files = [named_config(name, finetune_config_dir()) for name in extra_files]  # --config small
    if "use_amp" in overrides and not overrides.pop("use_amp"):
        overrides["amp"] = "off"
    size = check_size(positionals[0] if positionals else overrides.get("size"),
                      "fcmae-finetune SIZE [CHECKPOINT], e.g. fcmae-finetune atto fcmae_atto.pth --demo")
    if len(positionals) > 1:
        overrides["finetune"] = positionals[1]
    overrides["size"] = size
    root = finetune_config_dir()
    files = [root / "defaults.yaml", root / "sizes" / f"{size}.yaml"]
    if overrides.get("demo"):
        files.append(root / "demo.yaml")
    values = layered_settings(files + list(extra_files), overrides)
    values["given"] = sorted(given_keys(overrides, files[2:] + list(extra_files)))
    values["size"] = check_size(values["size"], "")
    if not values.get("output_dir"):
        data_path = parse_optional_path(values["data_path"])
        values["output_dir"] = (default_output_dir("finetune", values["size"], data_path) if data_path
                                else os.path.join("output", "finetune", values["size"] + "_demo" * values["demo"]))
    if not values.get("log_dir"):
        values["log_dir"] = os.path.join(str(values["output_dir"]), "tensorboard")
    return build_config(FinetuneConfig, values)
