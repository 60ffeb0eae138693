"""The pre-training command's typed config, resolved from configs/pretrain/ and the command line.

Settings: configs/pretrain/defaults.yaml < sizes/SIZE.yaml <
schedules/SCHEDULE.yaml < --config FILE < command-line flags; then
`PretrainConfig` (frozen) checks every value once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import sparse
from fcmae.data.folder import MAX_IN_CHANS
from fcmae.data.gpu_decode import DECODE_MODES
from fcmae.data.image_io import LAYOUTS
from fcmae.data.stats import MeanStd, check_mean_std_setting, parse_mean_std
from fcmae.runtime.batch_fit import BATCH_FIT_MODES, batch_size_given, parse_batch_fit
from fcmae.runtime.config import Flags, choices, config_root, default_output_dir, layered_settings, read_command_line
from fcmae.runtime.errors import ConfigError, UsageError
from fcmae.runtime.settings import TrainConfig, build_config, parse_optional_path, setting
from sparse import BACKENDS
from sparse.masking import PATCH_SIZE, check_mask_ratio

# The reference release's flag names (and a few spellings) -> config keys; its flags without meaning here.
FLAGS = Flags(
    aliases={"model": "size", "accum_iter": "update_freq", "decoder_embed_dim": "decoder_dim",
             "save_ckpt_freq": "save_every"},
    boolean=("dry_run", "norm_pix_loss", "demo_data", "allow_config_change", "compile"),
    ignored=("pin_mem", "no_pin_mem", "dist_on_itp", "auto_resume"),
    ignored_with_value=("dist_url", "local_rank", "start_epoch"),
)


def check_size(name: Optional[str], usage: str) -> str:
    """The registry name of a model size; `usage` completes the error when none is given (both commands)."""
    if name is None:
        raise UsageError(f"no model size given: {usage} (sizes: {', '.join(sparse.MODEL_SIZES)})")
    try:
        return sparse.check_size(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_arch(cfg: TrainConfig) -> None:
    """ConfigError unless the size, depths and dims make a model (both commands' configs call it)."""
    try:
        sparse.sizes.resolve_arch(cfg.size, cfg.depths, cfg.dims)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """Every pre-training setting; each is described in configs/pretrain/defaults.yaml."""

    schedule: str
    decoder_dim: int = setting(1)
    decoder_depth: int = setting(1)
    norm_pix_loss: bool
    backend: str = setting(choices=BACKENDS)
    batch_fit: str = setting(choices=BATCH_FIT_MODES, parse=parse_batch_fit)  # auto: fitted to the GPU (batch_fit)
    mask_ratio: float
    demo_data: bool
    demo_crop_size: int = setting(1)
    demo_per_photo: int = setting(1)
    crop_scale: Tuple[float, float]
    max_bad_fraction: float = setting(0.0, 1.0, high_open=True)
    cpu_threads: Optional[int] = setting(1)
    vis_images: int = setting(0)
    # kNN monitor (fcmae.eval.knn)
    knn_data_path: Optional[str] = setting(parse=parse_optional_path)  # None = off; 'demo' = the demo set
    knn_every: int = setting(1)
    knn_k: int = setting(1)
    knn_temperature: float = setting(0.0, low_open=True)
    init_std: float = setting(0.0, low_open=True)
    decay_grn_and_mask_token: bool
    # data: channels, normalisation, decoding, .npy layout; and continued pre-training (--init)
    in_chans: int = setting(1, MAX_IN_CHANS)
    mean: MeanStd = setting(parse=parse_mean_std)
    std: MeanStd = setting(parse=parse_mean_std)
    decode: str = setting(choices=DECODE_MODES)
    layout: str = setting(choices=LAYOUTS)
    init: Optional[str] = setting(parse=parse_optional_path)

    def validate(self) -> None:
        super().validate()
        check_arch(self)
        check_mean_std_setting(self.in_chans, self.mean, self.std)
        if self.init is not None and not Path(self.init).expanduser().is_file():
            raise ConfigError(f"--init checkpoint not found: {self.init} (give an FCMAE checkpoint to start from, "
                              "or none)")
        if self.input_size % PATCH_SIZE:
            raise ConfigError(f"input_size must be a positive multiple of {PATCH_SIZE} (the mask's patch size), "
                              f"got {self.input_size}; e.g. 224 or 96")
        try:
            check_mask_ratio(self.mask_ratio, (self.input_size // PATCH_SIZE) ** 2)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if not self.data_path and not self.demo_data:
            raise ConfigError(
                "no training data: give an image folder with --data_path /path/to/imagenet (the folder itself or "
                "with train/ inside), or run the built-in demo on CPU: launch/pretrain.sh atto demo")


def pretrain_config_dir() -> Path:
    return config_root() / "pretrain"


def resolve_config(argv: Optional[Sequence[str]] = None, doc: str = __doc__) -> PretrainConfig:
    """The command line (`SIZE SCHEDULE [--key value ...]`, or the reference's flags) -> PretrainConfig."""
    positionals, overrides, extra_files = read_command_line(argv, doc, FLAGS, 2)
    size = check_size(positionals[0] if positionals else overrides.get("size"),
                      "fcmae-pretrain SIZE SCHEDULE, e.g. fcmae-pretrain atto demo")
    schedule = positionals[1] if len(positionals) > 1 else overrides.pop("schedule", "800ep")
    overrides.pop("schedule", None)
    overrides["size"] = size
    root = pretrain_config_dir()
    schedule_file = root / "schedules" / f"{schedule}.yaml"
    if not schedule_file.is_file():
        raise UsageError(f"unknown schedule {schedule!r}; choose one of: {', '.join(choices(root / 'schedules'))}")
    values = layered_settings([root / "defaults.yaml", root / "sizes" / f"{size}.yaml", schedule_file,
                               *extra_files], overrides)
    if batch_size_given(overrides, extra_files):
        values["batch_fit"] = "off"  # the user's per-GPU batch wins over fitting one to the GPU
    values["size"] = check_size(values["size"], "")
    values["schedule"] = str(schedule)
    if not values.get("output_dir"):
        values["output_dir"] = default_output_dir("pretrain", f"{values['size']}_{schedule}",
                                                 parse_optional_path(values["data_path"]))
    if not values.get("log_dir"):
        values["log_dir"] = os.path.join(str(values["output_dir"]), "tensorboard")
    return build_config(PretrainConfig, values)
