"""Fine-tuning and evaluation of ConvNeXt V2 classifiers.

    fcmae-finetune SIZE [CHECKPOINT] [--key value ...]
    python -m finetune.main_finetune atto output/pretrain/atto_demo/checkpoint-last.pth --demo
    launch/finetune.sh base fcmae_base.pth --data_path /path/to/imagenet

SIZE is one of the 8 ConvNeXt V2 sizes. CHECKPOINT (or --finetune) is the
pre-trained weights: an FCMAE checkpoint of this project or of the reference
release (converted on the fly), a file written by fcmae-convert, or `none` to
train from scratch. Settings: configs/finetune/defaults.yaml <
sizes/SIZE.yaml (the published or derived recipe) < demo.yaml (with --demo)
< --config FILE < command-line flags. The reference release's flags work as
well (--model, --finetune, --nb_classes, --layer_decay, --layer_decay_type,
--model_ema, --model_ema_decay, --model_ema_eval, --mixup, --cutmix,
--smoothing, --reprob, --drop_path, --eval, --resume, --blr, --update_freq,
...), also in their `--flag true` form.

--eval evaluates only (top-1 / top-5 on val/): the checkpoint given by
--resume, else the newest in output_dir, else CHECKPOINT, at the input size,
crop_pct, in_chans, normalisation and layout stored in its config (given
flags win, with a note when they differ); results go to eval.jsonl beside
that checkpoint, or in --output_dir when given. Fine-tuning starts at the
pre-training checkpoint's input size unless --input_size is given, and
keeps checkpoint-best.pth (the epoch of the best val top-1). Checkpoints,
auto-resume, pre-emption (SIGTERM / SIGUSR1), progress lines, TensorBoard and
log.jsonl work as in pre-training, and so do unreadable training images
(skipped, each logged once, the run stops when more than max_bad_fraction
are bad); an unreadable validation image stops with its name (another image
in its place would bias the accuracy).

Labelled shards (fcmae.data.labelled_splits): --data_path may name a folder
holding train-*.tar and val-*.tar (or train/ and val/ of .tar files), or the
training shards' spec (DIR/train-{000000..000099}.tar, pipe:COMMAND), the
validation spec being the same text with its last `train` replaced by `val`;
classes from their _info.json, else --num_classes. The training stream's
epoch holds --train_num_samples or _info.json's count, and its position goes
in the checkpoints (a resumed run continues it); validation reads every
sample once.

Own data (docs/own-data.md): in_chans (must match the weights' stem),
layout (.npy), mean/std: the config's lists; else the values stored in the
checkpoint resumed or evaluated, or (for null) in the pre-training
checkpoint's config; else ImageNet's for 3-channel 8-bit data and computed
(auto) otherwise. The values used are stored in config.yaml and checkpoints.
"""

if __name__ == "__main__":  # first thing: a stop signal during the slow imports below must not kill us
    from fcmae.runtime.lifeline import die_with_launcher
    from fcmae.runtime.signals import install_stop_handler

    die_with_launcher()  # started by the launcher or torchrun: end with it, never train on as an orphan
    install_stop_handler()

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from timm.utils import ModelEmaV3

import sparse
from fcmae.data.folder import IMAGENET_MEAN, IMAGENET_STD, BadImageTracker, DataError, collate_images, list_images
from fcmae.data.labelled_splits import ShardSplits, find_labelled_data, split_name, split_size
from fcmae.data.shard_stream import ShardStream
from fcmae.data.shards import epoch_samples
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime import distributed, resume
from fcmae.runtime.command import TrainSpec
from fcmae.runtime.config import dump_config
from fcmae.runtime.device import grad_scaler, model_compiler, precision_note
from fcmae.runtime.errors import CheckpointError, PlanError, UsageError
from fcmae.runtime.loader import seed_everything, train_loader
from fcmae.runtime.logs import JsonlLogger, log
from fcmae.runtime.plan import LoopSettings, Plan, make_plan, plan_lines
from fcmae.runtime.report import epoch_line_timing, finish_run
from fcmae.runtime.trainer import Trainer
from fcmae.weights.layouts import ConversionError
from finetune import data as ftdata
from finetune.checkpoint_settings import EVAL_KEYS, FINETUNE_KEYS, settings_from_checkpoint, stored_config
from finetune.config import FinetuneConfig
from finetune.config import resolve_config as _resolve
from finetune.engine import ClassificationStep, evaluate
from finetune.model import build_model, load_pretrained, read_pretrained
from finetune.optim import build_optimizer

# Settings a resumed checkpoint must share with the run (they define the model's parameters).
MODEL_KEYS = ("size", "depths", "dims", "num_classes", "in_chans")
# Settings whose change on resume is taken as given besides the runtime's (all others stop; fcmae.runtime.resume):
# those of both commands, and the pre-trained weights, the recipe's name and the head's initial scale (used
# only at the start), what is evaluated each epoch, --eval, and bad-image tolerance.
HARMLESS = ("finetune", "recipe_source", "head_init_scale", "model_ema_eval", "eval",
                                    "max_bad_fraction")
# The values of the data settings that checkpoints written before they existed were trained with.
OLD_DEFAULTS = {"in_chans": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "layout": "auto",
                "drop_last": True, "shuffle_buffer": 1000}


def resolve_config(argv=None) -> FinetuneConfig:
    """The command line -> FinetuneConfig (see finetune.config)."""
    return _resolve(argv, __doc__)


# ---------------------------------------------------------------- the plan
def plan_run(cfg: FinetuneConfig, world_size: int, num_images=None) -> Plan:
    """make_plan (`drop_last: false` keeps each epoch's last batch), and Mixup/CutMix's need of an even per-GPU
    batch after the batch is fitted."""
    plan = make_plan(cfg, world_size, num_images, keep_last=not cfg.drop_last, even_batches=cfg.mixes)
    if cfg.mixes and plan.batch_size % 2:
        raise PlanError(f"Mixup/CutMix need an even per-GPU batch, got {plan.batch_size} (effective batch "
                        f"{plan.effective_batch} over {world_size} processes); change --batch_size, "
                        "--effective_batch or the GPU count")
    return plan


def format_plan(cfg: FinetuneConfig, plan: Plan, data: str, num_classes, sizes_from: str = "",
                val_images: Optional[int] = None, val_name: str = "val/") -> str:
    """The printed plan; `sizes_from` says where the input size and crop came from when not from the settings;
    `val_images`: the validation set's size, when known; `val_name`: what it is."""
    depths, dims = sparse.sizes.resolve_arch(cfg.size, cfg.depths, cfg.dims)
    return "\n".join([
        "Fine-tuning plan" if not cfg.eval else "Evaluation plan",
        f"  model            convnextv2_{cfg.size} (depths {list(depths)}, dims {list(dims)}), "
        f"{num_classes} classes, drop path {cfg.drop_path}, head init scale {cfg.head_init_scale}",
        f"  recipe           {cfg.recipe_source or 'custom'}: {plan.epochs} epochs, {plan.warmup_epochs} warmup, "
        f"layer decay {cfg.layer_decay} ({cfg.layer_decay_type}), wd {cfg.weight_decay}",
        f"  regularisation   RandAugment {cfg.aa}, mixup {cfg.mixup}, cutmix {cfg.cutmix}, smoothing "
        f"{cfg.smoothing}, reprob {cfg.reprob}, EMA " + (f"{cfg.model_ema_decay}" if cfg.model_ema else "off"),
        f"  pre-trained      {cfg.finetune or 'none (from scratch)'}",
        f"  images           {cfg.input_size}x{cfg.input_size}, evaluated with crop_pct {cfg.crop_pct}"
        + (f" ({sizes_from})" if sizes_from else ""),
        *plan_lines(cfg, plan, data, images="training images", keep_hint="--drop_last false trains on them too",
                    data_lines=[f"  validation       all {val_images} images of {val_name} after each epoch (none "
                                "left out)"]
                    if val_images is not None else []),
    ])


def describe(cfg: FinetuneConfig, world_size: int) -> str:
    """The plan for `world_size` processes before any image is read (dry runs and the launcher): the folders
    are checked and their images counted, or the shards' counts read from their _info.json (the built-in demo's
    are not, before it is built)."""
    root, num_classes, counts = ftdata.data_root(cfg, build=False), cfg.num_classes or "(from data)", {}
    data, val_name = root, "val/"
    if cfg.data_path:
        data, classes = find_labelled_data(cfg.data_path, num_classes=cfg.num_classes)
        num_classes = len(classes)
        if isinstance(data, ShardSplits):
            counts = {"train": epoch_samples(cfg.train_num_samples, data.train, log), "val": data.val.num_samples}
            val_name = split_name(data, "val")
        else:
            counts = {split: sum(len(list_images(root / split / name)) for name in classes)
                      for split in ("train", "val")}
    return format_plan(cfg, plan_run(cfg, world_size, counts.get("train")),
                       data.describe() if isinstance(data, ShardSplits) else str(root), num_classes,
                       "" if "input_size" in cfg.given else "or the checkpoint's, where it stores one",
                       val_images=counts.get("val"), val_name=val_name)


# ---------------------------------------------------------------- checkpoints
def is_finetune_checkpoint(state: Dict[str, Any]) -> bool:
    return all(k in state for k in ("model", "config", "run_state")) and "finetune" in state["config"]


def check_resumable(saved: Dict[str, Any], cfg: FinetuneConfig, path) -> None:
    """Clear error unless the checkpoint is a fine-tuning checkpoint of this run's model."""
    resume.check_same_model(saved, cfg.to_dict(), path, SPEC)


def load_weights(model, checkpoint: Dict[str, Any], path) -> None:
    """Pre-trained weights (read with `read_pretrained`) into `model`, converted on the fly when they are
    FCMAE's; logs what was loaded."""
    report = load_pretrained(model, checkpoint, str(path))
    for line in report.lines():
        log(line)


# ---------------------------------------------------------------- the run
def _new_model(cfg: FinetuneConfig, num_classes: int):
    return build_model(cfg.size, num_classes, drop_path=cfg.drop_path, head_init_scale=cfg.head_init_scale,
                       depths=cfg.depths, dims=cfg.dims, in_chans=cfg.in_chans)


def with_stored_settings(cfg: FinetuneConfig, stored: Optional[Dict[str, Any]], keys,
                         source: str) -> Tuple[FinetuneConfig, List[str]]:
    """`cfg` with the settings `keys` taken from a checkpoint's stored config where the user did not give them,
    and the keys taken (finetune.checkpoint_settings); logs what was taken and a note for each given setting
    that differs."""
    found = settings_from_checkpoint(cfg.to_dict(), stored, keys, cfg.given, source)
    for line in found.lines():
        log(line)
    return cfg.replace(**found.changes), list(found.taken)


def eval_folder(cfg: FinetuneConfig, checkpoint: Optional[Path], main: bool) -> Path:
    """Where --eval appends eval.jsonl: --output_dir when given, else beside the evaluated `checkpoint`; checked
    writable by the main process."""
    folder = Path(cfg.output_dir) if "output_dir" in cfg.given else checkpoint.parent
    try:
        if main:
            ckpt.check_writable(folder)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; eval.jsonl goes there (give --output_dir for another folder)") from None
    return folder


def evaluate_only(cfg: FinetuneConfig, info: distributed.DistInfo) -> int:
    """--eval: top-1 / top-5 of one checkpoint on val/ (see the module docstring for which checkpoint), at the
    input size, crop, channels, normalisation and layout stored in its config unless given."""
    # A given folder is checked before anything is read: eval.jsonl is written after the whole validation set.
    out = eval_folder(cfg, None, info.is_main) if "output_dir" in cfg.given else None
    data, classes = ftdata.prepare_splits(cfg, info)
    resumed = ckpt.find_resume(cfg.resume, cfg.output_dir)
    path = resumed or (Path(cfg.finetune) if cfg.finetune else None)
    # rank 0's choice: every rank evaluates the same file
    path, resumed = distributed.broadcast_object((path, resumed is not None))
    if path is None:
        raise UsageError(f"--eval needs a checkpoint: --resume PATH, a checkpoint in {cfg.output_dir}, "
                         "or CHECKPOINT")
    out = out or eval_folder(cfg, path, info.is_main)
    # A training checkpoint of this command, or weights from elsewhere (.safetensors included), read safely.
    saved = resume.read_checkpoint(path) if resumed else read_pretrained(path)
    cfg, _ = with_stored_settings(cfg, stored_config(saved), EVAL_KEYS, f"the checkpoint {path}")
    seed_everything(cfg.seed + info.rank)
    model = _new_model(cfg, len(classes))
    weights = {"model": model}
    finetuned = is_finetune_checkpoint(saved)
    if finetuned:
        check_resumable(saved, cfg.replace(num_classes=len(classes)), path)
        model.load_state_dict(saved["model"])
        if saved.get("ema") is not None and cfg.model_ema_eval:
            weights["ema"] = _new_model(cfg, len(classes))
            weights["ema"].load_state_dict(saved["ema"])
    else:
        report = load_pretrained(model, saved, str(path), purpose="the model to evaluate (--eval)")
        if any(k.startswith("head.fc.") for k in report.missing):
            raise UsageError(f"{path} has no classifier head for {len(classes)} classes: evaluation needs a "
                             "fine-tuned checkpoint (fine-tune first, then --eval --resume CHECKPOINT)")
    cfg, _, val = ftdata.prepare_data(cfg, data, classes, resumed=saved.get("config") if finetuned else None,
                                      pretrained=None if finetuned else saved.get("config"), evaluating=True)
    del saved
    loader = ftdata.val_loader(cfg, val, info)
    results = {}
    for name, m in weights.items():
        r = results[name] = evaluate(m.to(info.device), loader, info.device, cfg.amp)
        top5 = f"  top-5 {r['acc5']:.2f}%" if "acc5" in r else ""  # more than 5 classes only
        log(f"eval {name}: top-1 {r['acc1']:.2f}%{top5}  loss {r['loss']:.4f}  "
            f"({r['count']} images of {split_name(data, 'val')} at {cfg.input_size}x{cfg.input_size}, crop_pct "
            f"{cfg.crop_pct}, checkpoint {path})")
    if info.is_main:
        JsonlLogger(out / "eval.jsonl").write({
            "type": "eval", "checkpoint": str(path), "input_size": cfg.input_size, "crop_pct": cfg.crop_pct,
            **{f"{name}_{k}": v for name, r in results.items() for k, v in r.items()}})
    log(f"results appended to {out / 'eval.jsonl'}")
    return 0


def train(cfg: FinetuneConfig, info: distributed.DistInfo) -> int:
    """Fine-tune on the processes of `info` (the runtime holds the lock and the process group: TrainSpec.run)."""
    device, main = info.device, info.is_main
    out = Path(cfg.output_dir)  # created and checked writable by lock.hold on every rank
    compile_fn = model_compiler(cfg, device)

    # Everything that can fail on bad input comes before any compute.
    data, classes = ftdata.prepare_splits(cfg, info)
    num_classes = len(classes)
    cfg = cfg.replace(num_classes=num_classes)
    resume_from, saved = resume.resume_checkpoint(cfg.resume, out)  # rank 0 picks it for every rank
    if saved is not None:
        check_resumable(saved, cfg, resume_from)
    pretrained = read_pretrained(cfg.finetune) if saved is None and cfg.finetune else None
    # The input size (and crop) the run was trained at, or its pre-training's, unless given.
    source = (f"the fine-tuning checkpoint {resume_from}" if saved is not None
              else f"the pre-training checkpoint {cfg.finetune}")
    cfg, taken = with_stored_settings(cfg, stored_config(saved if saved is not None else pretrained),
                                      FINETUNE_KEYS, source)
    seed_everything(cfg.seed + info.rank)
    model = _new_model(cfg, num_classes)
    if pretrained is not None:
        load_weights(model, pretrained, cfg.finetune)
    cfg, train_set, val_set = ftdata.prepare_data(cfg, data, classes,
                                           resumed=saved.get("config") if saved is not None else None,
                                           pretrained=pretrained.get("config") if pretrained is not None else None)
    del pretrained
    plan = plan_run(cfg, info.world_size, len(train_set))
    if saved is not None:
        old_plan = resume.check_resume(saved, cfg.to_dict(), plan, resume_from, SPEC.harmless_on_resume,
                                       cfg.allow_config_change)
    if main:
        print(format_plan(cfg, plan, data.describe() if isinstance(data, ShardSplits) else str(data), num_classes,
                          f"{' and '.join(taken)} from {source}" if taken else "", val_images=split_size(val_set),
                          val_name=split_name(data, "val") if isinstance(data, ShardSplits) else "val/"), flush=True)
        dump_config({**cfg.to_dict(), "plan": plan.to_dict(), "classes": classes}, out / "config.yaml")

    model.to(device)
    depths, _ = model.arch
    optimizer = build_optimizer(model, plan.lr, cfg.weight_decay, cfg.layer_decay, depths, cfg.layer_decay_type,
                                cfg.betas)
    ema = None
    if cfg.model_ema:
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    # The best validation top-1 so far (of the weights or the EMA): acc1, epoch, weights, checkpoint.
    best: Dict[str, Any] = {}
    epoch_is_best = [False]
    mixup = ftdata.make_mixup(cfg.to_dict(), num_classes)
    bad_images = BadImageTracker(len(train_set), cfg.max_bad_fraction, logger=lambda m: log(m, main_only=False))
    step = ClassificationStep(ftdata.make_criterion(cfg.to_dict(), mixup), mixup, device)
    stream = train_set if isinstance(train_set, ShardStream) else None  # shards: its position goes in checkpoints
    trainer = Trainer(model, optimizer, step, LoopSettings.of(cfg, plan), info, out, cfg.log_dir,
                      {**cfg.to_dict(), "plan": plan.to_dict()}, scaler=grad_scaler(device, cfg.amp),
                      after_step=ema.update if ema is not None else None,
                      extra_state=lambda: {"ema": ema.module.state_dict() if ema is not None else None,
                                           "best": best, "classes": classes,
                                           **({"stream": stream.positions(trainer.state.epoch,
                                                                          trainer.state.iteration)}
                                              if stream is not None else {})},
                      compile_fn=compile_fn, bad_inputs=bad_images, is_best_epoch=lambda: epoch_is_best[0])
    saved_stream = saved.get("stream") if saved is not None else None
    if saved is not None:
        trainer.restore(saved, resume_from, cfg.seed)
        resume.align_state(trainer.state, old_plan, plan)
        if ema is not None and saved.get("ema") is not None:
            ema.module.load_state_dict(saved["ema"])
        elif ema is not None:  # a checkpoint trained without EMA: the average starts from the restored weights
            ema.set(model)
        best.update(saved.get("best") or {})
        del saved
    state = trainer.state
    if state.epoch >= cfg.epochs:
        log(f"nothing to do: {state.epoch} of {cfg.epochs} epochs already done in {out}")
        return 0
    val_batches = ftdata.val_loader(cfg, val_set, info)
    if precision_note(device, cfg.amp):
        log(precision_note(device, cfg.amp))

    def end_epoch(train_loss: float) -> None:
        """Validate (the weights, and the EMA when asked) and log the epoch's summary."""
        metrics = evaluate(model, val_batches, device, cfg.amp)
        # acc5 and ema_acc5 only with more than 5 classes (evaluate)
        summary = {"epoch": state.epoch + 1, "step": state.step, "train_loss": train_loss, "acc1": metrics["acc1"],
                   **({"acc5": metrics["acc5"]} if "acc5" in metrics else {}), "val_loss": metrics["loss"],
                   **trainer.epoch_timing}
        if ema is not None and cfg.model_ema_eval:
            ema_metrics = evaluate(ema.module, val_batches, device, cfg.amp)
            summary["ema_acc1"] = ema_metrics["acc1"]
            if "acc5" in ema_metrics:
                summary["ema_acc5"] = ema_metrics["acc5"]
        top, weights = max((summary["acc1"], "model"), (summary.get("ema_acc1", -1.0), "EMA"),
                           key=lambda candidate: candidate[0])  # the model's on a tie
        epoch_is_best[0] = top > best.get("acc1", -1.0)
        if epoch_is_best[0]:
            best.update(acc1=top, epoch=state.epoch + 1, weights=weights, checkpoint=str(out / ckpt.BEST_NAME))
        state.history.append(summary)
        trainer.jsonl.write({"type": "epoch", **summary})
        trainer.tb.scalars({k: v for k, v in summary.items() if k not in ("epoch", "step")}, state.step,
                           prefix="epoch/")
        trainer.tb.flush()
        log(f"epoch {state.epoch + 1}/{cfg.epochs} done: train loss {train_loss:.4f}, val top-1 "
            f"{metrics['acc1']:.2f}%" + (f", top-5 {metrics['acc5']:.2f}%" if "acc5" in metrics else "")
            + (f", EMA top-1 {summary['ema_acc1']:.2f}%" if "ema_acc1" in summary else "")
            + epoch_line_timing(trainer.epoch_timing))

    loader = train_loader(train_set, plan, cfg.num_workers, cfg.seed, info, collate_fn=collate_images)
    note = stream.resume_note(saved_stream) if stream is not None else None
    if note:
        log(note)
    val_count = split_size(val_set)
    log(f"training: {len(train_set)} images in {num_classes} classes, {plan.iters_per_epoch} iterations/epoch, "
        f"validation on {'all' if val_count is None else val_count} images, output in {out}"
        + (f"; torch.compile ({cfg.compile_backend}) for training, eager validation" if compile_fn else ""))
    if not trainer.fit(loader, end_epoch):
        return 0
    last = state.history[-1]
    log(f"done: {cfg.epochs} epochs; final top-1 {last['acc1']:.2f}%"
        + (f", top-5 {last['acc5']:.2f}%" if "acc5" in last else "")
        + (f" (EMA top-1 {last['ema_acc1']:.2f}%)" if "ema_acc1" in last else "")
        + f"; best top-1 {best['acc1']:.2f}%"
        + (f" ({best['weights']}, epoch {best['epoch']}) in {best['checkpoint']}" if "checkpoint" in best else "")
        + f"; checkpoints in {out}")
    if main:
        for line in finish_run(out):
            log(line)
    return 0


SPEC = TrainSpec("fcmae-finetune", FinetuneConfig, resolve_config, describe, train, model_keys=MODEL_KEYS,
                 harmless=HARMLESS, old_defaults=OLD_DEFAULTS,
                 checkpoint_kind="a fine-tuning checkpoint (pre-trained weights go in CHECKPOINT / --finetune)",
                 is_own_checkpoint=is_finetune_checkpoint, evaluate=evaluate_only,
                 expected_errors=(DataError, ConversionError))

run = SPEC.run  # a real run of a resolved config (tests and notebooks call it)
main = SPEC.main  # the console entry point


if __name__ == "__main__":
    main()
