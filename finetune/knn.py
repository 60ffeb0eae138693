"""fcmae-knn: weighted k-nearest-neighbour accuracy of frozen encoder features.

    fcmae-knn CKPT --data_path D [--k 20] [--temperature 0.07] [--size SIZE]
    python -m finetune.knn CKPT --demo
    torchrun --nproc_per_node 8 -m finetune.knn CKPT --data_path /path/to/imagenet

CKPT is an FCMAE checkpoint, converted weights (.pth or .safetensors), or
`none` (random weights of --size, the baseline). D holds train/<class>/ and
val/<class>/ with the same classes, or is labelled shards as fine-tuning
reads them (fcmae.data.labelled_splits; --num_classes where their _info.json
names no classes); each split is read once, in order. The input size, crop_pct, channels,
normalisation and .npy layout are those stored in CKPT's config (training
checkpoints of pre-training and fine-tuning store it; a pre-training
checkpoint is evaluated as its kNN monitor saw the folder), else 224, 0.875,
3 channels and ImageNet's; --input_size and --crop_pct win, with a note
when they differ from the checkpoint's; --demo reads the demo set at its
own size.

The features, the weighted kNN (k nearest training images, votes
exp(cosine similarity / T), as in DINO) and the distributed evaluation
(features of each rank's shard, training features gathered on every rank)
live in fcmae.eval.knn, which pre-training's kNN monitor uses as well; this
module is the command around them (arguments, loading the weights, the
folder checks), shared with fcmae-linprobe.
"""

from __future__ import annotations

if __name__ == "__main__":  # first thing: a Ctrl-C while the modules below load is one line, not a traceback
    from fcmae.runtime.signals import quiet_ctrl_c

    quiet_ctrl_c()

import argparse
from typing import Dict, List, Optional

from fcmae.data.folder import DataError
from fcmae.data.labelled_splits import find_labelled_data, split_size
from fcmae.data.stats import IMAGENET_MEAN, IMAGENET_STD
from fcmae.eval.knn import EVAL_CROP_PCT, knn_evaluate, make_loaders
from fcmae.runtime import distributed
from fcmae.runtime.command import run_cli
from fcmae.runtime.config import config_root, load_config, parse_args_suggesting, parse_value
from fcmae.runtime.errors import UsageError
from fcmae.weights.layouts import ConversionError
from finetune import data as ftdata
from finetune.checkpoint_settings import PROBE_KEYS, settings_from_checkpoint, stored_config
from finetune.model import load_backbone, read_pretrained

__all__ = ["add_common_args", "command_parser", "prepare", "evaluated_at", "main"]


# ---------------------------------------------------------------- command line (shared with linprobe)
def _int_list(text: str) -> List[int]:
    value = parse_value(text)
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(v, int) for v in value):
        raise argparse.ArgumentTypeError(f"expected four integers like [2, 2, 6, 2], got {text!r}")
    return list(value)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="FCMAE checkpoint, converted weights (.pth / .safetensors), or none")
    p.add_argument("--data_path", default=None, help="folder with train/<class>/ and val/<class>/, or labelled "
                   "shards (train-*.tar and val-*.tar in a folder, or the train shards' spec)")
    p.add_argument("--num_classes", type=int, default=None,
                   help="class count of labelled shards whose _info.json names no classes")
    p.add_argument("--demo", action="store_true", help="the fine-tuning demo set (configs/finetune/demo.yaml)")
    p.add_argument("--size", default=None, help="model size (default: the checkpoint's; atto for none)")
    p.add_argument("--depths", type=_int_list, default=None, help="custom depths (tests), e.g. '[1, 1, 1, 1]'")
    p.add_argument("--dims", type=_int_list, default=None, help="custom dims (tests), e.g. '[8, 16, 16, 16]'")
    p.add_argument("--input_size", type=int, default=None,
                   help="image side (default: the checkpoint's, else 224; demo: 64)")
    p.add_argument("--crop_pct", type=float, default=None, help="resize to input_size / crop_pct, centre crop "
                                                                 "(default: the checkpoint's, else 0.875; demo 1.0)")
    p.add_argument("--batch_size", type=int, default=64, help="images per process for feature extraction")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of `none`")


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of fcmae-knn or fcmae-linprobe with their common arguments; each command adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_common_args(p)
    return p


def data_config(args) -> Dict:
    """Input size, crop, image format and root of the data, from the flags (and configs/finetune/demo.yaml with
    --demo); `given` lists the settings the flags or the demo set fixed (a checkpoint's do not replace them)."""

    if args.demo == (args.data_path is not None):
        raise UsageError("give exactly one of --data_path D (with train/<class>/ and val/<class>/) and --demo")
    # The kNN monitor's crop (fcmae.eval.knn): a pre-training checkpoint, which stores no crop, is evaluated as
    # the monitor saw it.
    cfg = {"input_size": 224, "crop_pct": EVAL_CROP_PCT, "in_chans": 3, "mean": None, "std": None, "layout": "auto"}
    given = set()
    if args.demo:  # the demo set at its own size, as the pre-training demo's kNN monitor reads it
        folder = config_root() / "finetune"
        demo = load_config([folder / "defaults.yaml", folder / "demo.yaml"])
        cfg.update(input_size=demo["input_size"], crop_pct=demo["crop_pct"])
        given.update(("input_size", "crop_pct"))
    for key in ("input_size", "crop_pct"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
            given.add(key)
    if cfg["input_size"] < 32 or cfg["input_size"] % 32:
        raise UsageError(f"--input_size must be a positive multiple of 32, got {cfg['input_size']}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")

    cfg["root"] = ftdata.demo_root(demo) if args.demo else args.data_path  # a shard spec stays text
    cfg["given"] = given
    return cfg


def with_checkpoint_settings(cfg: Dict, weights: Optional[Dict], checkpoint: str) -> Dict:
    """`cfg` with the input size, crop, channels, normalisation and layout stored in the checkpoint's config
    where not given (finetune.checkpoint_settings); `notes`: what to print about them. Without stored
    values the normalisation is ImageNet's (3 channels)."""
    found = settings_from_checkpoint(cfg, stored_config(weights), PROBE_KEYS, cfg["given"],
                                     f"the checkpoint {checkpoint}")
    cfg = {**cfg, **found.changes, "notes": found.lines()}
    if cfg["mean"] is None or cfg["std"] is None:
        if cfg["in_chans"] != 3:
            raise UsageError(f"{checkpoint} stores no normalisation (mean/std) for its {cfg['in_chans']}-channel "
                             "images; evaluate the checkpoint of the training run, which stores it")
        cfg["mean"], cfg["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return cfg


def prepare(args, command: str = "fcmae-knn"):
    """(dist info, frozen model, train loader, val loader, classes, settings) for this rank; bad input fails before
    compute, in messages that name `command`."""

    cfg = data_config(args)
    cfg["root"], classes = find_labelled_data(cfg["root"], command, num_classes=args.num_classes)
    if args.num_classes is not None and args.num_classes != len(classes):
        raise UsageError(f"--num_classes is {args.num_classes} but {cfg['root']} has {len(classes)} classes")
    if len(classes) < 2:
        raise UsageError(f"{cfg['root']} has {len(classes)} class; kNN and linear probing need at least 2")
    random_weights = args.checkpoint is None or str(args.checkpoint).lower() == "none"
    weights = None if random_weights else read_pretrained(args.checkpoint)
    cfg = with_checkpoint_settings(cfg, weights, args.checkpoint)
    model = load_backbone(args.checkpoint, args.size, args.depths, args.dims, seed=args.seed,
                          in_chans=cfg["in_chans"], weights=weights, purpose=f"the model {command} evaluates")
    del weights
    try:
        info = distributed.init_distributed(args.device)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    train_loader, val_loader = make_loaders(cfg["root"], classes, cfg["input_size"], cfg["crop_pct"], args.batch_size,
                                            args.num_workers, info.rank, info.world_size, info.device,
                                            in_chans=cfg["in_chans"], mean=cfg["mean"], std=cfg["std"],
                                            layout=cfg["layout"])
    return info, model.to(info.device), train_loader, val_loader, classes, cfg


def describe(args, model, classes, cfg, loaders) -> str:
    depths, dims = model.arch
    images = ["?" if n is None else n for n in (split_size(loader.dataset) for loader in loaders)]
    return "\n".join(cfg.get("notes", []) + [
        f"model  {args.checkpoint} (depths {list(depths)}, dims {list(dims)})",
        f"data   {cfg['root']}: {len(classes)} classes, {images[0]} train / {images[1]} val images at "
        f"{evaluated_at(cfg)}; {cfg['in_chans']} channel(s), mean {list(cfg['mean'])}, std {list(cfg['std'])}"])


def evaluated_at(cfg: Dict) -> str:
    """The images' size and crop, for the result lines."""
    return f"{cfg['input_size']}x{cfg['input_size']}, crop_pct {cfg['crop_pct']}"


def run_command(prog: str, body, argv=None, build_parser=None) -> None:
    """Parse, run `body(args)`, print bad input as one line (exit 2); shared by fcmae-knn and fcmae-linprobe."""

    args = parse_args_suggesting(build_parser(), argv)

    def run_and_clean_up() -> int:
        try:
            return body(args)
        finally:
            distributed.cleanup()

    run_cli(prog, run_and_clean_up, (UsageError, DataError, ConversionError))


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("fcmae-knn", "Weighted kNN accuracy of frozen ConvNeXt V2 features (global-average-pooled "
                       "last stage, L2-normalised).")
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    return p


def knn_main(args) -> int:
    if args.k < 1 or args.temperature <= 0:
        raise UsageError(f"--k must be >= 1 and --temperature > 0, got {args.k} and {args.temperature}")
    info, model, train_loader, val_loader, classes, cfg = prepare(args)
    if info.is_main:
        print(describe(args, model, classes, cfg, [train_loader, val_loader]), flush=True)
    result = knn_evaluate(model.forward_features, train_loader, val_loader, info.device, len(classes), args.k,
                          args.temperature)
    if info.is_main:
        top5 = f"  top-5 {result['top5']:.2f}%" if "top5" in result else ""  # more than 5 classes only
        print(f"knn    k={args.k} T={args.temperature}: top-1 {result['top1']:.2f}%{top5}  "
              f"({result['count']} val images at {evaluated_at(cfg)}, checkpoint {args.checkpoint})", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> None:
    run_command("fcmae-knn", knn_main, argv, build_parser)


if __name__ == "__main__":
    main()
