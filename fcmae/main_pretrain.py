"""FCMAE pre-training command.

    fcmae-pretrain SIZE SCHEDULE [--key value ...]
    python -m fcmae.main_pretrain atto demo
    launch/pretrain.sh huge 800ep --data_path /path/to/imagenet

SIZE is one of the 8 ConvNeXt V2 sizes, SCHEDULE one of configs/pretrain/
schedules (800ep, 1600ep, demo). Settings come from configs/pretrain/
defaults.yaml < sizes/SIZE.yaml < schedules/SCHEDULE.yaml < --config FILE <
command-line flags. The reference release's flags (--model convnextv2_base,
--data_path, --output_dir, --batch_size, --update_freq, --blr, --epochs,
--warmup_epochs, --input_size, --mask_ratio, --resume, --seed, --device)
work as well.

Resuming: by default the newest checkpoint in output_dir is resumed. Epoch
checkpoints and pre-emption checkpoints (SIGTERM / SIGUSR1, saved at the
next optimizer step, mid-epoch) both resume exactly where they were taken:
data order and augmentation depend only on (seed, epoch, sample index), and
the RNG states of every process are saved, so on CPU a resumed run
reproduces the losses of an uninterrupted one.
"""

import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

import sparse
from fcmae import checkpoint as ckpt
from fcmae import distributed
from fcmae.config import (
    ConfigError, apply_overrides, check_amp, check_int, choices, config_root, dump_config, load_config,
    normalise_reference_flags, parse_overrides, split_positionals,
)
from fcmae.data import (
    IMAGENET_MEAN, IMAGENET_STD, BadImageTracker, DataError, ImageFolderDataset, collate_images, find_image_root,
    pretrain_transform,
)
from fcmae.engine import NonFiniteLossError, RunState, autocast_context, build_optimizer, grad_scaler
from fcmae.logging_utils import log
from fcmae.masking import PATCH_SIZE, check_mask_ratio, num_kept
from fcmae.model import build_fcmae
from fcmae.training import (
    checkpoint_saver, find_resume, loop_config, restore, seed_everything, train_epochs, train_loader, wrap_ddp,
)

# Flag names of the reference release (and a few spellings) -> config keys.
ALIASES = {
    "model": "size",
    "accum_iter": "update_freq",
    "decoder_embed_dim": "decoder_dim",
    "save_ckpt_freq": "save_every",
}
BOOLEAN_FLAGS = ("dry_run", "norm_pix_loss", "demo_data")
# Reference flags that have no meaning here; accepted so documented commands keep working.
IGNORED = ("pin_mem", "no_pin_mem", "dist_on_itp", "auto_resume")
# Ignored reference flags that take a value (`--dist_url env://`, `--local_rank 0`, `--start_epoch 0`).
IGNORED_WITH_VALUE = ("dist_url", "local_rank", "start_epoch")
# Settings a resumed checkpoint must share with the run (they define the model's parameters).
MODEL_KEYS = ("size", "depths", "dims", "decoder_dim", "decoder_depth", "norm_pix_loss")


class UsageError(ValueError):
    """Bad input found before any compute; printed without a traceback."""


# ---------------------------------------------------------------- config
def pretrain_config_dir() -> Path:
    return config_root() / "pretrain"


def resolve_config(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse the command line into the resolved config dict (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        sys.exit(0)
    positionals, rest = split_positionals(argv, 2)
    flags = BOOLEAN_FLAGS + IGNORED
    argv_overrides = normalise_reference_flags(rest, flags, IGNORED_WITH_VALUE)
    overrides = parse_overrides(argv_overrides, ALIASES, flags)
    for key in IGNORED + IGNORED_WITH_VALUE:
        overrides.pop(key, None)
    extra_files = overrides.pop("config", None) or []
    if isinstance(extra_files, str):
        extra_files = [extra_files]

    size = positionals[0] if positionals else overrides.get("size")
    schedule = positionals[1] if len(positionals) > 1 else overrides.get("schedule", "800ep")
    overrides.pop("schedule", None)
    if size is None:
        raise UsageError("no model size given: fcmae-pretrain SIZE SCHEDULE, e.g. fcmae-pretrain atto demo "
                         f"(sizes: {', '.join(sparse.MODEL_SIZES)})")
    try:
        size = sparse.check_size(size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    overrides["size"] = size
    root = pretrain_config_dir()
    schedule_file = root / "schedules" / f"{schedule}.yaml"
    if not schedule_file.is_file():
        raise UsageError(f"unknown schedule {schedule!r}; choose one of: {', '.join(choices(root / 'schedules'))}")
    cfg = load_config([root / "defaults.yaml", root / "sizes" / f"{size}.yaml", schedule_file, *extra_files])
    try:
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    cfg["size"] = sparse.check_size(cfg["size"])
    cfg["schedule"] = schedule
    for key in ("data_path", "output_dir", "log_dir", "resume"):  # '2024' is a folder name, not a number
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            cfg[key] = str(cfg[key])
    if not cfg.get("output_dir"):
        cfg["output_dir"] = os.path.join("output", "pretrain", f"{cfg['size']}_{schedule}")
    if not cfg.get("log_dir"):
        cfg["log_dir"] = os.path.join(cfg["output_dir"], "tensorboard")
    validate(cfg)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    """Every check that needs no data and no compute."""
    size = cfg["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
        raise UsageError(f"input_size must be a positive multiple of {PATCH_SIZE} (the mask's patch size), "
                         f"got {size!r}; e.g. 224 or 96")
    try:
        ratio = float(cfg["mask_ratio"])
        check_mask_ratio(ratio, (size // PATCH_SIZE) ** 2)
        sparse.sizes.resolve_arch(cfg["size"], cfg.get("depths"), cfg.get("dims"))
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    for key in ("batch_size", "epochs", "effective_batch", "decoder_dim", "decoder_depth", "print_every"):
        check_int(cfg, key)
    for key in ("warmup_epochs", "num_workers", "save_every", "keep_checkpoints", "vis_images"):
        check_int(cfg, key, 0)
    if cfg["update_freq"] not in ("auto", None):
        check_int(cfg, "update_freq")
    for key in ("world_size", "cpu_threads", "exit_after_steps"):
        if cfg[key] is not None:
            check_int(cfg, key)
    for key in ("blr",) + (("lr",) if cfg.get("lr") is not None else ()):
        if not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            raise UsageError(f"{key} must be a positive number, got {cfg[key]!r}")
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise UsageError(f"warmup_epochs ({cfg['warmup_epochs']}) exceeds epochs ({cfg['epochs']})")
    check_amp(cfg)
    if cfg["backend"] not in sparse.BACKENDS:
        raise UsageError(f"unknown backend {cfg['backend']!r}; choose one of: {', '.join(sparse.BACKENDS)}")
    if not 0 <= float(cfg["max_bad_fraction"]) < 1:
        raise UsageError(f"max_bad_fraction must be in [0, 1), got {cfg['max_bad_fraction']}")
    scale = cfg["crop_scale"]
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise UsageError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {scale!r}")
    if not cfg.get("data_path") and not cfg.get("demo_data"):
        raise UsageError(
            "no training data: give an image folder with --data_path /path/to/imagenet (the folder itself or "
            "with train/ inside), or run the built-in demo on CPU: launch/pretrain.sh atto demo"
        )


# ---------------------------------------------------------------- the plan
def make_plan(cfg: Dict[str, Any], world_size: int, num_images: Optional[int] = None) -> Dict[str, Any]:
    """Batch, accumulation, lr and step counts for `world_size` processes (and the data set, if known)."""
    per_iter = cfg["batch_size"] * world_size
    if cfg["update_freq"] in ("auto", None):
        update_freq = max(1, math.ceil(cfg["effective_batch"] / per_iter))
    else:
        update_freq = int(cfg["update_freq"])
    effective = per_iter * update_freq
    lr = float(cfg["lr"]) if cfg.get("lr") is not None else float(cfg["blr"]) * effective / 256
    plan = {"world_size": world_size, "batch_size": cfg["batch_size"], "update_freq": update_freq,
            "effective_batch": effective, "lr": lr, "epochs": cfg["epochs"], "warmup_epochs": cfg["warmup_epochs"]}
    if num_images is not None:
        if per_iter > num_images:
            raise UsageError(
                f"batch larger than the data set: batch_size {cfg['batch_size']} x {world_size} processes = "
                f"{per_iter} images per iteration, but the data set has only {num_images}; lower --batch_size"
            )
        iters = (num_images // world_size // cfg["batch_size"]) // update_freq * update_freq
        if iters == 0:
            raise UsageError(
                f"the data set ({num_images} images) is smaller than one optimizer step "
                f"({effective} images = batch_size {cfg['batch_size']} x {world_size} processes x update_freq "
                f"{update_freq}); lower --effective_batch or --update_freq, or add data"
            )
        steps = iters // update_freq
        plan.update(num_images=num_images, iters_per_epoch=iters, steps_per_epoch=steps,
                    total_steps=steps * cfg["epochs"], warmup_steps=steps * cfg["warmup_epochs"])
    return plan


def format_plan(cfg: Dict[str, Any], plan: Dict[str, Any], data: str) -> str:
    depths, dims = sparse.sizes.resolve_arch(cfg["size"], cfg.get("depths"), cfg.get("dims"))
    grid = cfg["input_size"] // PATCH_SIZE
    kept = num_kept(grid * grid, cfg["mask_ratio"])
    lines = [
        "FCMAE pre-training plan",
        f"  model            convnextv2_{cfg['size']} (depths {list(depths)}, dims {list(dims)}), "
        f"decoder {cfg['decoder_depth']} x {cfg['decoder_dim']}, backend {cfg['backend']}",
        f"  schedule         {cfg['schedule']}: {plan['epochs']} epochs, {plan['warmup_epochs']} warmup",
        f"  input            {cfg['input_size']}x{cfg['input_size']}, mask ratio {cfg['mask_ratio']} "
        f"({kept} of {grid * grid} patches visible)",
        f"  world size       {plan['world_size']}",
        f"  per-GPU batch    {plan['batch_size']}",
        f"  accumulation     {plan['update_freq']}",
        f"  effective batch  {plan['effective_batch']} (= {plan['batch_size']} x {plan['world_size']} x "
        f"{plan['update_freq']}; target {cfg['effective_batch']})",
        f"  lr               {plan['lr']:.4g}" + ("" if cfg.get("lr") is not None else
                                                  f" (= blr {cfg['blr']} x {plan['effective_batch']} / 256)"),
        f"  data             {data}" + (f" ({plan['num_images']} images)" if "num_images" in plan else ""),
    ]
    if "steps_per_epoch" in plan:
        lines.append(f"  steps            {plan['steps_per_epoch']} optimizer steps/epoch, "
                     f"{plan['total_steps']} in all ({plan['warmup_steps']} warmup)")
    lines.append(f"  output           {cfg['output_dir']}")
    return "\n".join(lines)


def check_output_dir(path) -> None:
    try:
        ckpt.check_writable(path)
    except ckpt.CheckpointError as e:
        raise UsageError(str(e)) from None


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


# ---------------------------------------------------------------- data
def data_root(cfg: Dict[str, Any], build: bool = True) -> Path:
    """The image folder to train on (building the demo set if it is the demo and `build`)."""
    if cfg.get("data_path"):
        try:
            return find_image_root(cfg["data_path"])
        except DataError as e:
            raise UsageError(str(e)) from None
    from fcmae.demo_data import demo_pretrain_folder

    if not build:
        return Path("<built-in demo photographs>")
    return demo_pretrain_folder(crop_size=cfg["demo_crop_size"], per_photo=cfg["demo_per_photo"]) / "train"


def vis_batch(dataset: ImageFolderDataset, cfg: Dict[str, Any]) -> Optional[torch.Tensor]:
    """A fixed batch (resized, centre-cropped) for the per-epoch reconstruction picture."""
    count = min(cfg["vis_images"], len(dataset))
    if count == 0:
        return None
    tf = transforms.Compose([
        transforms.Resize(cfg["input_size"], interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg["input_size"]),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    images = []
    for i in np.linspace(0, len(dataset) - 1, count).round().astype(int):
        try:
            images.append(tf(dataset.load(int(i))))
        except (OSError, ValueError, Image.DecompressionBombError):  # what the training set skips, too
            continue
    return torch.stack(images) if images else None


# ---------------------------------------------------------------- checkpoints
def check_resumable(state: Dict[str, Any], cfg: Dict[str, Any], path) -> List[str]:
    """Clear error if the checkpoint's model differs from this run's; returns the other changed settings."""
    if "model" not in state or "config" not in state or "run_state" not in state:
        raise UsageError(f"{path} is not an FCMAE pre-training checkpoint of this project "
                         f"(keys: {', '.join(sorted(state)) or 'none'})")
    old = state["config"]
    diffs = [f"{k}: checkpoint {old.get(k)!r}, this run {cfg.get(k)!r}" for k in MODEL_KEYS
             if _norm(old.get(k)) != _norm(cfg.get(k))]
    if diffs:
        raise UsageError(
            f"cannot resume {path}: it was trained with another model ({'; '.join(diffs)}). "
            "Use another --output_dir, or --resume none to start afresh"
        )
    ignore = set(MODEL_KEYS) | {"resume", "dry_run", "world_size", "exit_after_steps", "output_dir", "log_dir"}
    return [f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in cfg
            if k not in ignore and _norm(old.get(k)) != _norm(cfg.get(k))]


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- the run
def run(cfg: Dict[str, Any]) -> int:
    if cfg["dry_run"]:
        world = cfg["world_size"] or 1
        root = data_root(cfg, build=False)
        out = Path(cfg["output_dir"])
        parent = _nearest_existing(out)
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"output directory {out} is not writable")
        print(format_plan(cfg, make_plan(cfg, world), str(root)))
        if os.environ.get("FCMAE_PREFLIGHT") == "1":  # launch/common.sh checks the plan before starting
            print("plan checked; starting training", flush=True)
        else:
            print("dry run: nothing was trained")
        return 0

    info = distributed.init_distributed(cfg["device"])
    threads = torch.get_num_threads()
    try:
        if info.device.type == "cpu" and cfg["cpu_threads"]:
            torch.set_num_threads(cfg["cpu_threads"])
        return _train(cfg, info)
    finally:
        torch.set_num_threads(threads)  # matters when called in-process (tests, notebooks)
        distributed.cleanup()


def _train(cfg: Dict[str, Any], info: distributed.DistInfo) -> int:
    device, rank, world, main = info.device, info.rank, info.world_size, info.is_main
    if cfg["world_size"] and cfg["world_size"] != world:
        log(f"note: planned world size {cfg['world_size']} but {world} processes are running; using {world}")
    out = Path(cfg["output_dir"])
    check_output_dir(out)

    # Data (before the model, so bad data fails before any compute).
    if main:
        root = data_root(cfg)
    distributed.barrier()
    if not main:
        root = data_root(cfg)
    try:
        dataset = ImageFolderDataset(root, pretrain_transform(cfg["input_size"], cfg["crop_scale"]), seed=cfg["seed"])
    except DataError as e:
        raise UsageError(str(e)) from None
    plan = make_plan(cfg, world, len(dataset))

    # Resume (checked before building the model).
    resume_from = find_resume(cfg)
    saved = None
    if resume_from is not None:
        try:
            saved = ckpt.load_checkpoint(resume_from)
        except ckpt.CheckpointError as e:
            raise UsageError(f"{e}. Remove it, or pass --resume none to start afresh") from None
        changed = check_resumable(saved, cfg, resume_from)
        if changed:
            log(f"note: resuming with changed settings: {'; '.join(changed)}")

    if main:
        print(format_plan(cfg, plan, str(root)), flush=True)
        dump_config({**cfg, "plan": plan}, out / "config.yaml")

    # Seeds: the mask and drop path differ per process; augmentation depends on (seed, epoch, index).
    seed_everything(cfg["seed"] + rank)
    model = build_fcmae(cfg["size"], img_size=cfg["input_size"], mask_ratio=cfg["mask_ratio"],
                        decoder_dim=cfg["decoder_dim"], decoder_depth=cfg["decoder_depth"],
                        norm_pix_loss=cfg["norm_pix_loss"], backend=cfg["backend"], depths=cfg.get("depths"),
                        dims=cfg.get("dims"), drop_path_rate=cfg["drop_path"]).to(device)
    optimizer = build_optimizer(model, plan["lr"], cfg["weight_decay"], cfg["betas"])
    scaler = grad_scaler(device, cfg["amp"])

    state = RunState()
    if saved is not None:
        state = restore(saved, resume_from, model, optimizer, scaler, cfg["seed"], info)
        del saved
    if state.epoch >= cfg["epochs"]:
        log(f"nothing to do: {state.epoch} of {cfg['epochs']} epochs already done in {out}")
        return 0

    loader = train_loader(dataset, cfg, plan, info, collate_fn=collate_images)
    loop = loop_config(cfg, plan, world)
    bad_images = BadImageTracker(len(dataset), float(cfg["max_bad_fraction"]), logger=lambda m: log(m, main_only=False))
    fixed_imgs = vis_batch(dataset, cfg) if main else None
    save = checkpoint_saver(out, cfg, info, model, optimizer, scaler, state)

    def loss_fn(model, batch):
        imgs, bad = batch
        if bad:
            bad_images.update(bad)
        loss, _, _ = model(imgs.to(device, non_blocking=True))
        return loss

    def end_epoch(epoch_loss, jsonl, tb):
        summary = {"epoch": state.epoch + 1, "loss": epoch_loss, "step": state.step}
        state.history.append(summary)
        jsonl.write({"type": "epoch", **summary})
        tb.scalars({"epoch_loss": epoch_loss}, state.step, prefix="train/")
        log(f"epoch {state.epoch + 1}/{cfg['epochs']} done: mean loss {epoch_loss:.4f}")
        if fixed_imgs is not None:
            _save_reconstruction(model, fixed_imgs, cfg, device, state.step, tb, out)

    log(f"training: {len(dataset)} images, {loop.iters_per_epoch} iterations/epoch, output in {out}")
    try:
        finished = train_epochs(wrap_ddp(model, info), loader, loss_fn, optimizer, scaler, state, loop, cfg, device,
                                save, end_epoch)
    except DataError as e:
        raise UsageError(str(e)) from None
    if not finished:
        return 0
    log(f"done: {cfg['epochs']} epochs, final epoch loss {state.history[-1]['loss']:.4f}; checkpoints in {out}")
    return 0


def _save_reconstruction(model, fixed_imgs, cfg, device, step: int, tb, out: Path) -> None:
    """The reconstruction picture of the fixed batch: reconstruction.png and TensorBoard."""
    from fcmae.visualize import reconstruction_grid, save_png

    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_context(device, cfg["amp"]):
        imgs = fixed_imgs.to(device)
        mask = model.random_mask(imgs, generator=torch.Generator(device=device).manual_seed(cfg["seed"]))
        _, pred, mask = model(imgs, mask)
    model.train(was_training)
    picture = reconstruction_grid(model, imgs, mask, pred)
    save_png(picture, out / "reconstruction.png")
    tb.image("reconstruction (original | masked | reconstruction | + visible)", picture, step)
    tb.flush()


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        cfg = resolve_config(argv)
        code = run(cfg)
    except (UsageError, ConfigError) as e:
        print(f"fcmae-pretrain: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"fcmae-pretrain: error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    sys.exit(code)


if __name__ == "__main__":
    main()
