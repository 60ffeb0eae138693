"""FCMAE pre-training command.

    fcmae-pretrain SIZE SCHEDULE [--key value ...]
    python -m fcmae.pretrain.main atto demo
    launch/pretrain.sh huge 800ep --data_path /path/to/imagenet

SIZE is one of the 8 ConvNeXt V2 sizes, SCHEDULE one of configs/pretrain/
schedules (800ep, 1600ep, demo). Settings come from configs/pretrain/
defaults.yaml < sizes/SIZE.yaml < schedules/SCHEDULE.yaml < --config FILE <
command-line flags. The reference release's flags (--model convnextv2_base,
--data_path, --output_dir, --batch_size, --update_freq, --blr, --epochs,
--warmup_epochs, --input_size, --mask_ratio, --resume, --seed, --device)
work as well.

Resuming: by default the newest checkpoint in output_dir is resumed. Epoch
checkpoints and pre-emption checkpoints (SIGTERM / SIGUSR1: the current
iteration ends, the run goes back to its last optimizer step and saves it,
mid-epoch) both resume exactly where they were taken:
data order and augmentation depend only on (seed, epoch, sample index), and
the RNG states of every process are saved, so on CPU a resumed run
reproduces the losses of an uninterrupted one.

Shards: --data_path may name WebDataset tar shards (a folder of .tar files,
DIR/train-{000000..000099}.tar, pipe:COMMAND); an epoch's length comes from
their _info.json or --train_num_samples, and a resumed run continues the
stream where the checkpoint was taken (fcmae.data.shard_stream).

Own data (docs/own-data.md): in_chans, mean/std (null, auto or lists;
resolved values are printed and stored in config.yaml and the checkpoints,
and a resumed run reuses them), decode (cpu/gpu/auto) and layout (.npy).
Continued pre-training: --init CKPT starts a new run from the weights of an
FCMAE checkpoint (fcmae.pretrain.init); a checkpoint to resume in
output_dir wins over --init.
"""

if __name__ == "__main__":  # first thing: a stop signal during the slow imports below must not kill us
    from fcmae.runtime.lifeline import die_with_launcher
    from fcmae.runtime.signals import install_stop_handler

    die_with_launcher()  # started by the launcher or torchrun: end with it, never train on as an orphan
    install_stop_handler()

import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

import sparse
from fcmae.data.demo import demo_pretrain_folder
from fcmae.data.folder import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageTracker,
    DataError,
    ImageFolderDataset,
    collate_images,
    find_image_root,
    list_images,
)
from fcmae.data.shard_sets import ShardImages
from fcmae.data.shards import ShardSpec, epoch_samples, find_shards
from fcmae.data.stats import saved_mean_std
from fcmae.eval.knn import KnnMonitor
from fcmae.model import FCMAE, build_fcmae
from fcmae.pretrain.batch_probe import fit_pretrain_batch
from fcmae.pretrain.config import PretrainConfig
from fcmae.pretrain.config import resolve_config as _resolve
from fcmae.pretrain.engine import EpochEnd, PretrainStep
from fcmae.pretrain.init import InitWeights, apply_init, check_fits, read_init
from fcmae.pretrain.optim import build_optimizer
from fcmae.runtime import distributed, resume
from fcmae.runtime.batch_fit import with_pending_note
from fcmae.runtime.command import TrainSpec
from fcmae.runtime.config import dump_config
from fcmae.runtime.device import grad_scaler, model_compiler, precision_note
from fcmae.runtime.errors import UsageError
from fcmae.runtime.loader import seed_everything, train_loader
from fcmae.runtime.logs import log
from fcmae.runtime.plan import LoopSettings, Plan, make_plan, plan_lines
from fcmae.runtime.report import finish_run
from fcmae.runtime.trainer import Trainer
from sparse.masking import PATCH_SIZE, num_kept

# Settings a resumed checkpoint must share with the run (they define the model's parameters).
MODEL_KEYS = ("size", "depths", "dims", "decoder_dim", "decoder_depth", "norm_pix_loss", "in_chans")
# Settings whose change on resume is taken as given besides the runtime's (all others stop; fcmae.runtime.resume):
# those of both commands, and the picture, the backend (the same computation), bad-image tolerance, the
# initialisation (used only at the start), the decoder of the same crops and the per-GPU split of the same
# effective batch (batch_fit).
HARMLESS = ("vis_images", "backend", "max_bad_fraction", "init_std", "init", "decode", "batch_fit")
# The values of the data settings that checkpoints written before they existed were trained with.
OLD_DEFAULTS = {"in_chans": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "decode": "cpu",
                "layout": "auto", "init": None, "batch_fit": "off", "shuffle_buffer": 1000}


def resolve_config(argv=None) -> PretrainConfig:
    """The command line -> PretrainConfig (see fcmae.pretrain.config)."""
    return _resolve(argv, __doc__)


# ---------------------------------------------------------------- the plan
def format_plan(cfg: PretrainConfig, plan: Plan, data: str) -> str:
    depths, dims = sparse.sizes.resolve_arch(cfg.size, cfg.depths, cfg.dims)
    grid = cfg.input_size // PATCH_SIZE
    kept = num_kept(grid * grid, cfg.mask_ratio)
    return "\n".join([
        "FCMAE pre-training plan",
        f"  model            convnextv2_{cfg.size} (depths {list(depths)}, dims {list(dims)}), "
        f"decoder {cfg.decoder_depth} x {cfg.decoder_dim}, backend {cfg.backend}, in_chans {cfg.in_chans}",
        *([f"  init             {cfg.init} (weights only; resuming a checkpoint in output_dir wins)"]
          if cfg.init else []),
        f"  schedule         {cfg.schedule}: {plan.epochs} epochs, {plan.warmup_epochs} warmup",
        f"  input            {cfg.input_size}x{cfg.input_size}, mask ratio {cfg.mask_ratio} "
        f"({kept} of {grid * grid} patches visible)",
        *plan_lines(cfg, plan, data),
    ])


def describe(cfg: PretrainConfig, world_size: int) -> str:
    """The plan for `world_size` processes before any image is read (dry runs and the launcher): the data
    folder's images are counted (the built-in demo's are not, before it is built)."""
    out = Path(cfg.output_dir).resolve()
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"output directory {cfg.output_dir} is not writable")
    root = data_root(cfg, build=False)
    if isinstance(root, ShardSpec):
        num_images = shard_samples(cfg, root)
    else:
        num_images = len(list_images(root)) if cfg.data_path else None
    if num_images == 0:
        raise UsageError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in sub-folders "
                         "too)")
    plan = with_pending_note(make_plan(cfg, world_size, num_images), cfg.batch_fit, cfg.device, cfg.update_freq)
    return format_plan(cfg, plan, data_name(root))


# ---------------------------------------------------------------- data
def data_root(cfg: PretrainConfig, build: bool = True) -> Union[Path, ShardSpec]:
    """The image folder or the shards to train on (building the demo set if it is the demo and `build`)."""
    if cfg.data_path:
        try:
            return find_shards(cfg.data_path) or find_image_root(cfg.data_path)
        except DataError as e:
            raise UsageError(str(e)) from None

    if not build:
        return Path("<built-in demo photographs>")
    return demo_pretrain_folder(crop_size=cfg.demo_crop_size, per_photo=cfg.demo_per_photo) / "train"


def data_name(root: Union[Path, ShardSpec]) -> str:
    return root.describe() if isinstance(root, ShardSpec) else str(root)


def shard_samples(cfg: PretrainConfig, spec: ShardSpec) -> int:
    """The samples an epoch of the shards holds: --train_num_samples, else _info.json's count."""
    try:
        return epoch_samples(cfg.train_num_samples, spec, log)
    except DataError as e:
        raise UsageError(str(e)) from None


def build_dataset(cfg: PretrainConfig, root: Union[Path, ShardSpec],
                  device: torch.device) -> Union[ImageFolderDataset, ShardImages]:
    """The training set: format checked, decoding chosen, mean/std resolved (computed and printed for auto)."""
    try:
        if isinstance(root, ShardSpec):
            return ShardImages(root, shard_samples(cfg, root), input_size=cfg.input_size, crop_scale=cfg.crop_scale,
                               in_chans=cfg.in_chans, mean=cfg.mean, std=cfg.std, decode=cfg.decode,
                               layout=cfg.layout, cuda=device.type == "cuda", seed=cfg.seed,
                               buffer=cfg.shuffle_buffer, logger=log)
        return ImageFolderDataset(root, input_size=cfg.input_size, crop_scale=cfg.crop_scale, seed=cfg.seed,
                                  in_chans=cfg.in_chans, mean=cfg.mean, std=cfg.std, decode=cfg.decode,
                                  layout=cfg.layout, cuda=device.type == "cuda", logger=log)
    except DataError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------- checkpoints
def check_resumable(saved: Dict[str, Any], cfg: PretrainConfig, path) -> PretrainConfig:
    """Clear error unless the checkpoint is this command's with this run's model (resume.check_same_model).

    Returns the run's config with the checkpoint's mean/std where the run does not give them as lists: a
    resumed run normalises as it started, without computing 'auto' again. Other changes: resume.check_resume.
    """
    resume.check_same_model(saved, cfg.to_dict(), path, SPEC)
    stored = saved_mean_std(saved["config"], cfg.in_chans)
    if stored is not None:
        cfg = cfg.replace(mean=cfg.mean if isinstance(cfg.mean, tuple) else stored[0],
                          std=cfg.std if isinstance(cfg.std, tuple) else stored[1])
    return cfg


def read_init_weights(cfg: PretrainConfig) -> InitWeights:
    """The --init file's weights, checked against this run's encoder and decoder (before any data is read)."""
    depths, dims = sparse.sizes.resolve_arch(cfg.size, cfg.depths, cfg.dims)
    init = read_init(cfg.init)
    check_fits(init, depths, dims, cfg.decoder_dim, cfg.decoder_depth)
    return init


# ---------------------------------------------------------------- the run
def build_model(cfg: PretrainConfig) -> FCMAE:
    """The run's FCMAE model, freshly initialised on CPU (the run and the batch fit's trial step build it alike)."""
    return build_fcmae(cfg.size, img_size=cfg.input_size, mask_ratio=cfg.mask_ratio, decoder_dim=cfg.decoder_dim,
                       decoder_depth=cfg.decoder_depth, norm_pix_loss=cfg.norm_pix_loss, backend=cfg.backend,
                       init_std=cfg.init_std, depths=cfg.depths, dims=cfg.dims, in_chans=cfg.in_chans,
                       drop_path_rate=cfg.drop_path)


def train(cfg: PretrainConfig, info: distributed.DistInfo) -> int:
    """Pre-train on the processes of `info` (the runtime holds the lock and the process group: TrainSpec.run)."""
    device, main = info.device, info.is_main
    if cfg.world_size and cfg.world_size != info.world_size:
        log(f"note: planned world size {cfg.world_size} but {info.world_size} processes are running; "
            f"using {info.world_size}")
    out = Path(cfg.output_dir)  # created and checked writable by lock.hold on every rank
    compile_fn = model_compiler(cfg, device)

    # Everything that can fail on bad input comes before any compute; rank 0 builds the demo set first.
    root, error = None, None
    if main:
        try:
            root = data_root(cfg)
        except UsageError as e:
            error = e
    distributed.raise_first_error(error)  # said on every rank: none is left waiting for rank 0 in a collective
    root = root or data_root(cfg)
    # Resume (checked before building the model); rank 0 picks the checkpoint for every rank.
    resume_from, saved = resume.resume_checkpoint(cfg.resume, out)
    if saved is not None:
        cfg = check_resumable(saved, cfg, resume_from)
    init = None
    if cfg.init and saved is not None:
        log(f"note: --init {cfg.init} is not used: resuming {resume_from} continues its own weights "
            "(--resume none starts afresh from --init)")
    elif cfg.init:
        init = read_init_weights(cfg)
    dataset = build_dataset(cfg, root, device)
    cfg = cfg.replace(mean=dataset.mean, std=dataset.std)  # resolved: saved in config.yaml and the checkpoints
    log(f"data: {len(dataset)} images of {cfg.in_chans} channel(s) of {dataset.dtype}, decode {dataset.decode}; "
        f"normalisation mean {list(cfg.mean)}, std {list(cfg.std)}")
    # batch_fit auto on CUDA: the largest per-GPU batch that fits the GPU (a measured step of a throwaway model)
    plan = make_plan(cfg, info.world_size, len(dataset), batch_choice=fit_pretrain_batch(cfg, info, build_model))
    if saved is not None:
        old_plan = resume.check_resume(saved, cfg.to_dict(), plan, resume_from, SPEC.harmless_on_resume,
                                       cfg.allow_config_change)
    knn_monitor = KnnMonitor.from_config(cfg, info)  # its folder is checked before anything is written
    if main:
        print(format_plan(cfg, plan, data_name(root)), flush=True)
        dump_config({**cfg.to_dict(), "plan": plan.to_dict()}, out / "config.yaml")
    if knn_monitor is not None:
        log(knn_monitor.describe())

    # Seeds: the mask and drop path differ per process; augmentation depends on (seed, epoch, index).
    seed_everything(cfg.seed + info.rank)
    model = build_model(cfg)
    if init is not None:
        for line in apply_init(model, init):
            log(line)
        del init
    model.to(device)
    optimizer = build_optimizer(model, plan.lr, cfg.weight_decay, cfg.betas, cfg.decay_grn_and_mask_token)
    bad_images = BadImageTracker(len(dataset), cfg.max_bad_fraction, logger=lambda m: log(m, main_only=False))
    stream = dataset if isinstance(dataset, ShardImages) else None  # its position goes in every checkpoint
    trainer = Trainer(model, optimizer, PretrainStep(dataset, device), LoopSettings.of(cfg, plan), info, out,
                      cfg.log_dir, {**cfg.to_dict(), "plan": plan.to_dict()}, scaler=grad_scaler(device, cfg.amp),
                      compile_fn=compile_fn, bad_inputs=bad_images,
                      extra_state=(lambda: {"stream": stream.positions(trainer.state.epoch, trainer.state.iteration)})
                      if stream is not None else None)
    saved_stream = saved.get("stream") if saved is not None else None
    if saved is not None:
        trainer.restore(saved, resume_from, cfg.seed)
        resume.align_state(trainer.state, old_plan, plan)
        del saved
    state = trainer.state
    if state.epoch >= cfg.epochs:
        log(f"nothing to do: {state.epoch} of {cfg.epochs} epochs already done in {out}")
        return 0
    fixed_images = dataset.fixed_batch(cfg.vis_images) if main and cfg.vis_images else None
    if precision_note(device, cfg.amp):
        log(precision_note(device, cfg.amp))

    loader = train_loader(dataset, plan, cfg.num_workers, cfg.seed, info, collate_fn=collate_images)
    note = stream.resume_note(saved_stream) if stream is not None else None
    if note:
        log(note)
    log(f"training: {len(dataset)} images, {plan.iters_per_epoch} iterations/epoch, output in {out}"
        + (f"; torch.compile ({cfg.compile_backend}): the first steps compile" if compile_fn else ""))
    try:
        finished = trainer.fit(loader, EpochEnd(trainer, model, cfg, knn_monitor, fixed_images))
    except DataError as e:
        raise UsageError(str(e)) from None
    if finished:
        log(f"done: {cfg.epochs} epochs, final epoch loss {state.history[-1]['loss']:.4f}; checkpoints in {out}")
        if main:
            for line in finish_run(out):
                log(line)
    return 0


SPEC = TrainSpec("fcmae-pretrain", PretrainConfig, resolve_config, describe, train, model_keys=MODEL_KEYS,
                 harmless=HARMLESS, old_defaults=OLD_DEFAULTS, checkpoint_kind="an FCMAE pre-training checkpoint")

run = SPEC.run  # a real run of a resolved config (tests and notebooks call it)
main = SPEC.main  # the console entry point


if __name__ == "__main__":
    main()
