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
--resume, else the newest in output_dir, else CHECKPOINT. Checkpoints,
auto-resume, pre-emption (SIGTERM / SIGUSR1), progress lines, TensorBoard and
log.jsonl work as in pre-training.
"""

import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from torch.utils.data import DataLoader

import sparse
from fcmae import checkpoint as ckpt
from fcmae import distributed
from fcmae.config import (
    ConfigError, apply_overrides, check_amp, check_int, check_number, config_root, dump_config, load_config,
    normalise_reference_flags, parse_overrides, split_positionals,
)
from fcmae.data import DataError
from fcmae.engine import NonFiniteLossError, RunState, grad_scaler
from fcmae.logging_utils import JsonlLogger, log
from fcmae.main_pretrain import UsageError, check_output_dir, make_plan
from fcmae.training import (
    checkpoint_saver, find_resume, loop_config, restore, seed_everything, train_epochs, train_loader, wrap_ddp,
)
from finetune import data as ftdata
from finetune.convert import ConversionError
from finetune.engine import evaluate
from finetune.model import build_model, load_pretrained
from finetune.optim import LAYER_DECAY_TYPES, build_optimizer

ALIASES = {
    "model": "size",
    "nb_classes": "num_classes",
    "accum_iter": "update_freq",
    "save_ckpt_freq": "save_every",
}
BOOLEAN_FLAGS = ("dry_run", "demo", "eval", "model_ema", "model_ema_eval", "use_amp")
# Reference flags with no meaning here (evaluation is always distributed and exact; pinning is automatic;
# ImageNet is just an image folder), accepted so documented commands keep working.
IGNORED = ("pin_mem", "no_pin_mem", "dist_eval", "dist_on_itp", "auto_resume", "disable_eval",
           "model_ema_force_cpu")
IGNORED_WITH_VALUE = ("data_set", "dist_url", "local_rank", "start_epoch")
# Settings a resumed checkpoint must share with the run (they define the model's parameters).
MODEL_KEYS = ("size", "depths", "dims", "num_classes")


# ---------------------------------------------------------------- config
def finetune_config_dir() -> Path:
    return config_root() / "finetune"


def resolve_config(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse the command line into the resolved config dict (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        sys.exit(0)
    positionals, rest = split_positionals(argv, 2)
    argv_overrides = normalise_reference_flags(rest, BOOLEAN_FLAGS + IGNORED, IGNORED_WITH_VALUE)
    overrides = parse_overrides(argv_overrides, ALIASES, BOOLEAN_FLAGS + IGNORED)
    for key in IGNORED:
        overrides.pop(key, None)
    if "use_amp" in overrides:
        if not overrides.pop("use_amp"):
            overrides["amp"] = "off"
    extra_files = overrides.pop("config", None) or []
    if isinstance(extra_files, str):
        extra_files = [extra_files]

    size = positionals[0] if positionals else overrides.get("size")
    if len(positionals) > 1:
        overrides["finetune"] = positionals[1]
    if size is None:
        raise UsageError("no model size given: fcmae-finetune SIZE [CHECKPOINT], e.g. fcmae-finetune atto "
                         f"fcmae_atto.pth --demo (sizes: {', '.join(sparse.MODEL_SIZES)})")
    try:
        size = sparse.check_size(size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    overrides["size"] = size
    root = finetune_config_dir()
    files = [root / "defaults.yaml", root / "sizes" / f"{size}.yaml"]
    if overrides.get("demo"):
        files.append(root / "demo.yaml")
    cfg = load_config(files + list(extra_files))
    try:
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    cfg["size"] = sparse.check_size(cfg["size"])
    if isinstance(cfg["finetune"], str) and cfg["finetune"].lower() in ("none", "", "scratch"):
        cfg["finetune"] = None
    if not cfg.get("output_dir"):
        cfg["output_dir"] = os.path.join("output", "finetune", cfg["size"] + ("_demo" if cfg["demo"] else ""))
    if not cfg.get("log_dir"):
        cfg["log_dir"] = os.path.join(cfg["output_dir"], "tensorboard")
    validate(cfg)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    """Every check that needs no data and no compute."""
    try:
        sparse.sizes.resolve_arch(cfg["size"], cfg.get("depths"), cfg.get("dims"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    for key in ("input_size", "batch_size", "epochs", "effective_batch", "print_every"):
        check_int(cfg, key)
    for key in ("warmup_epochs", "num_workers", "save_every", "keep_checkpoints"):
        check_int(cfg, key, 0)
    for key in ("world_size", "exit_after_steps", "num_classes"):
        if cfg[key] is not None:
            check_int(cfg, key)
    if cfg["update_freq"] not in ("auto", None):
        check_int(cfg, "update_freq")
    for key in ("blr",) + (("lr",) if cfg.get("lr") is not None else ()):
        check_number(cfg, key, 1e-12, float("inf"))
    check_number(cfg, "drop_path", 0.0, 1.0, high_open=True)
    check_number(cfg, "layer_decay", 1e-6, 1.0)
    check_number(cfg, "smoothing", 0.0, 1.0, high_open=True)
    check_number(cfg, "reprob", 0.0, 1.0)
    check_number(cfg, "crop_pct", 0.05, 1.0)
    check_number(cfg, "model_ema_decay", 0.0, 1.0, high_open=True)
    for key in ("mixup", "cutmix", "weight_decay", "min_lr", "head_init_scale"):
        check_number(cfg, key, 0.0, float("inf"))
    if cfg["layer_decay_type"] not in LAYER_DECAY_TYPES:
        raise UsageError(f"layer_decay_type must be one of {', '.join(LAYER_DECAY_TYPES)}, "
                         f"got {cfg['layer_decay_type']!r}")
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise UsageError(f"warmup_epochs ({cfg['warmup_epochs']}) exceeds epochs ({cfg['epochs']})")
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise UsageError(f"Mixup/CutMix need an even batch_size, got {cfg['batch_size']}")
    check_amp(cfg)
    if cfg["finetune"] is not None and not Path(cfg["finetune"]).is_file():
        raise UsageError(f"checkpoint not found: {cfg['finetune']} (give an FCMAE checkpoint, a file written by "
                         "fcmae-convert, or `none` to train from scratch)")
    if not cfg.get("data_path") and not cfg.get("demo"):
        raise UsageError("no data: give a folder with train/<class>/ and val/<class>/ with --data_path, or run "
                         "the built-in labelled demo with --demo")


# ---------------------------------------------------------------- data
def data_root(cfg: Dict[str, Any], build: bool = True) -> Path:
    if cfg.get("data_path"):
        return Path(cfg["data_path"]).expanduser()
    if not build:
        return Path("<built-in labelled demo photographs>")
    return ftdata.demo_root(cfg)


def prepare_data(cfg: Dict[str, Any], info: distributed.DistInfo):
    """(root, classes, train set, val set): the demo set is built by rank 0 first; splits checked."""
    if info.is_main:
        root = data_root(cfg)
    distributed.barrier()
    if not info.is_main:
        root = data_root(cfg)
    try:
        classes = ftdata.check_splits(root)
    except DataError as e:
        raise UsageError(str(e)) from None
    if cfg["num_classes"] is not None and cfg["num_classes"] != len(classes):
        raise UsageError(f"num_classes is {cfg['num_classes']} but the data set at {root} has {len(classes)} "
                         f"classes (folders in train/); drop --num_classes / --nb_classes or fix the data")
    train = ftdata.LabelledFolder(root / "train", classes, ftdata.train_transform(cfg), seed=cfg["seed"])
    val = ftdata.LabelledFolder(root / "val", classes, ftdata.eval_transform(cfg))
    return root, classes, train, val


def val_loader(cfg, val, info):
    sampler = ftdata.ShardSampler(len(val), info.rank, info.world_size)
    return DataLoader(val, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                      pin_memory=info.device.type == "cuda")


# ---------------------------------------------------------------- checkpoints
def read_checkpoint(path) -> Dict[str, Any]:
    try:
        return ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise UsageError(str(e)) from None


def is_finetune_checkpoint(state: Dict[str, Any]) -> bool:
    return all(k in state for k in ("model", "config", "run_state")) and "finetune" in state["config"]


def check_resumable(state: Dict[str, Any], cfg: Dict[str, Any], path) -> None:
    if not is_finetune_checkpoint(state):
        raise UsageError(f"{path} is not a fine-tuning checkpoint of this project (keys: "
                         f"{', '.join(sorted(map(str, state)))}); to start from pre-trained weights use "
                         f"CHECKPOINT / --finetune, and --resume none")
    old = state["config"]
    diffs = [f"{k}: checkpoint {old.get(k)!r}, this run {cfg.get(k)!r}" for k in MODEL_KEYS
             if _plain(old.get(k)) != _plain(cfg.get(k))]
    if diffs:
        raise UsageError(f"cannot use {path}: it holds another model ({'; '.join(diffs)}). "
                         "Use another --output_dir, or --resume none")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- the plan
def format_plan(cfg, plan, data: str, num_classes) -> str:
    depths, dims = sparse.sizes.resolve_arch(cfg["size"], cfg.get("depths"), cfg.get("dims"))
    lines = [
        "Fine-tuning plan" if not cfg["eval"] else "Evaluation plan",
        f"  model            convnextv2_{cfg['size']} (depths {list(depths)}, dims {list(dims)}), "
        f"{num_classes} classes, drop path {cfg['drop_path']}, head init scale {cfg['head_init_scale']}",
        f"  recipe           {cfg.get('recipe_source') or 'custom'}: {plan['epochs']} epochs, "
        f"{plan['warmup_epochs']} warmup, layer decay {cfg['layer_decay']} ({cfg['layer_decay_type']}), "
        f"wd {cfg['weight_decay']}",
        f"  regularisation   RandAugment {cfg['aa']}, mixup {cfg['mixup']}, cutmix {cfg['cutmix']}, "
        f"smoothing {cfg['smoothing']}, reprob {cfg['reprob']}, EMA "
        + (f"{cfg['model_ema_decay']}" if cfg["model_ema"] else "off"),
        f"  pre-trained      {cfg['finetune'] or 'none (from scratch)'}",
        f"  world size       {plan['world_size']}",
        f"  per-GPU batch    {plan['batch_size']}",
        f"  accumulation     {plan['update_freq']}",
        f"  effective batch  {plan['effective_batch']} (target {cfg['effective_batch']})",
        f"  lr               {plan['lr']:.4g}" + ("" if cfg.get("lr") is not None else
                                                  f" (= blr {cfg['blr']} x {plan['effective_batch']} / 256)"),
        f"  data             {data}" + (f" ({plan['num_images']} training images)" if "num_images" in plan else ""),
    ]
    if "steps_per_epoch" in plan:
        lines.append(f"  steps            {plan['steps_per_epoch']} optimizer steps/epoch, "
                     f"{plan['total_steps']} in all ({plan['warmup_steps']} warmup)")
    lines.append(f"  output           {cfg['output_dir']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the run
def run(cfg: Dict[str, Any]) -> int:
    if cfg["dry_run"]:
        plan = make_plan(cfg, cfg["world_size"] or 1)
        print(format_plan(cfg, plan, str(data_root(cfg, build=False)), cfg["num_classes"] or "(from data)"))
        print("dry run: nothing was trained")
        return 0
    info = distributed.init_distributed(cfg["device"])
    try:
        return _evaluate_only(cfg, info) if cfg["eval"] else _train(cfg, info)
    finally:
        distributed.cleanup()


def _new_model(cfg, num_classes):
    return build_model(cfg["size"], num_classes, drop_path=cfg["drop_path"], head_init_scale=cfg["head_init_scale"],
                       depths=cfg.get("depths"), dims=cfg.get("dims"))


def _evaluate_only(cfg: Dict[str, Any], info: distributed.DistInfo) -> int:
    root, classes, _, val = prepare_data(cfg, info)
    path = find_resume(cfg) or (Path(cfg["finetune"]) if cfg["finetune"] else None)
    if path is None:
        raise UsageError(f"--eval needs a checkpoint: --resume PATH, a checkpoint in {cfg['output_dir']}, "
                         "or CHECKPOINT")
    state = read_checkpoint(path)
    seed_everything(cfg["seed"] + info.rank)
    model = _new_model(cfg, len(classes))
    results = {}
    if is_finetune_checkpoint(state):
        check_resumable(state, {**cfg, "num_classes": len(classes)}, path)
        model.load_state_dict(state["model"])
        weights = {"model": model}
        if state.get("ema") is not None and cfg["model_ema_eval"]:
            ema_model = _new_model(cfg, len(classes))
            ema_model.load_state_dict(state["ema"])
            weights["ema"] = ema_model
    else:
        try:
            report = load_pretrained(model, state, str(path))
        except ConversionError as e:
            raise UsageError(str(e)) from None
        if any(k.startswith("head.fc.") for k in report.missing):
            raise UsageError(f"{path} has no classifier head for {len(classes)} classes: evaluation needs a "
                             "fine-tuned checkpoint (fine-tune first, then --eval --resume CHECKPOINT)")
        weights = {"model": model}
    loader = val_loader(cfg, val, info)
    for name, m in weights.items():
        results[name] = evaluate(m.to(info.device), loader, info.device, cfg["amp"])
        r = results[name]
        log(f"eval {name}: top-1 {r['acc1']:.2f}%  top-5 {r['acc5']:.2f}%  loss {r['loss']:.4f}  "
            f"({r['count']} images of {root / 'val'}, checkpoint {path})")
    if info.is_main:
        JsonlLogger(Path(cfg["output_dir"]) / "eval.jsonl").write({"type": "eval", "checkpoint": str(path), **{
            f"{name}_{k}": v for name, r in results.items() for k, v in r.items()}})
    return 0


def _train(cfg: Dict[str, Any], info: distributed.DistInfo) -> int:
    device, rank, world, main = info.device, info.rank, info.world_size, info.is_main
    out = Path(cfg["output_dir"])
    check_output_dir(out)

    # Everything that can fail on bad input comes before any compute.
    root, classes, train_set, val_set = prepare_data(cfg, info)
    num_classes = len(classes)
    cfg = {**cfg, "num_classes": num_classes}
    resume_from = find_resume(cfg)
    saved = read_checkpoint(resume_from) if resume_from is not None else None
    if saved is not None:
        check_resumable(saved, cfg, resume_from)
    seed_everything(cfg["seed"] + rank)
    model = _new_model(cfg, num_classes)
    if saved is None and cfg["finetune"]:
        try:
            report = load_pretrained(model, read_checkpoint(cfg["finetune"]), cfg["finetune"])
        except ConversionError as e:
            raise UsageError(str(e)) from None
        for line in report.lines():
            log(line)
    plan = make_plan(cfg, world, len(train_set))
    if main:
        print(format_plan(cfg, plan, str(root), num_classes), flush=True)
        dump_config({**cfg, "plan": plan, "classes": classes}, out / "config.yaml")

    model.to(device)
    depths, _ = model.arch
    optimizer = build_optimizer(model, plan["lr"], cfg["weight_decay"], cfg["layer_decay"], depths,
                                cfg["layer_decay_type"], cfg["betas"])
    scaler = grad_scaler(device, cfg["amp"])
    ema = None
    if cfg["model_ema"]:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg["model_ema_decay"])
    state, best = RunState(), {"acc1": 0.0}
    if saved is not None:
        state = restore(saved, resume_from, model, optimizer, scaler, cfg["seed"], info)
        if ema is not None and saved.get("ema") is not None:
            ema.module.load_state_dict(saved["ema"])
        best = saved.get("best") or best
        del saved
    if state.epoch >= cfg["epochs"]:
        log(f"nothing to do: {state.epoch} of {cfg['epochs']} epochs already done in {out}")
        return 0

    loader = train_loader(train_set, cfg, plan, info)
    val_batches = val_loader(cfg, val_set, info)
    mixup = ftdata.make_mixup(cfg, num_classes)
    criterion = ftdata.make_criterion(cfg, mixup)
    loop = loop_config(cfg, plan, world)
    save = checkpoint_saver(out, cfg, info, model, optimizer, scaler, state, extra=lambda: {
        "ema": ema.module.state_dict() if ema is not None else None, "best": best, "classes": classes})

    def loss_fn(model, batch):
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        return criterion(model(images), targets)

    def end_epoch(train_loss, jsonl, tb):
        """Validate (the weights, and the EMA when asked) and log the epoch's summary."""
        metrics = evaluate(model, val_batches, device, cfg["amp"])
        summary = {"epoch": state.epoch + 1, "step": state.step, "train_loss": train_loss, "acc1": metrics["acc1"],
                   "acc5": metrics["acc5"], "val_loss": metrics["loss"]}
        if ema is not None and cfg["model_ema_eval"]:
            ema_metrics = evaluate(ema.module, val_batches, device, cfg["amp"])
            summary.update(ema_acc1=ema_metrics["acc1"], ema_acc5=ema_metrics["acc5"])
        best["acc1"] = max(best["acc1"], summary["acc1"], summary.get("ema_acc1", 0.0))
        state.history.append(summary)
        jsonl.write({"type": "epoch", **summary})
        tb.scalars({k: v for k, v in summary.items() if k not in ("epoch", "step")}, state.step, prefix="epoch/")
        tb.flush()
        log(f"epoch {state.epoch + 1}/{cfg['epochs']} done: train loss {train_loss:.4f}, val top-1 "
            f"{metrics['acc1']:.2f}%, top-5 {metrics['acc5']:.2f}%"
            + (f", EMA top-1 {summary['ema_acc1']:.2f}%" if "ema_acc1" in summary else ""))

    log(f"training: {len(train_set)} images in {num_classes} classes, {loop.iters_per_epoch} iterations/epoch, "
        f"validation on {len(val_set)} images, output in {out}")
    finished = train_epochs(wrap_ddp(model, info), loader, loss_fn, optimizer, scaler, state, loop, cfg, device, save,
                            end_epoch, after_step=ema.update if ema is not None else None)
    if not finished:
        return 0
    last = state.history[-1]
    log(f"done: {cfg['epochs']} epochs; final top-1 {last['acc1']:.2f}%, top-5 {last['acc5']:.2f}%"
        + (f" (EMA top-1 {last['ema_acc1']:.2f}%)" if "ema_acc1" in last else "")
        + f"; best top-1 {best['acc1']:.2f}%; checkpoints in {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        cfg = resolve_config(argv)
        code = run(cfg)
    except (UsageError, ConfigError, DataError, ConversionError) as e:
        print(f"fcmae-finetune: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"fcmae-finetune: error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    sys.exit(code)


if __name__ == "__main__":
    main()
