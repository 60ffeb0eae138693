"""fcmae-knn: weighted k-nearest-neighbour accuracy of frozen encoder features.

    fcmae-knn CKPT --data_path D [--k 20] [--temperature 0.07] [--size SIZE]
    python -m finetune.knn CKPT --demo
    torchrun --nproc_per_node 8 -m finetune.knn CKPT --data_path /path/to/imagenet

CKPT is an FCMAE checkpoint, converted weights (.pth or .safetensors), or
`none` (random weights of --size, the baseline). D holds train/<class>/ and
val/<class>/ with the same classes.

The features, the weighted kNN (k nearest training images, votes
exp(cosine similarity / T), as in DINO) and the distributed evaluation
(features of each rank's shard, training features gathered on every rank)
live in fcmae.eval.knn, which pre-training's kNN monitor uses as well; this
module is the command around them (arguments, loading the weights, the
folder checks), shared with fcmae-linprobe.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

from fcmae.data import labelled
from fcmae.data.folder import DataError
from fcmae.eval.knn import knn_evaluate, make_loaders
from fcmae.runtime import distributed
from fcmae.runtime.command import run_cli
from fcmae.runtime.config import config_root, load_config, parse_value
from fcmae.runtime.errors import UsageError
from fcmae.weights.layouts import ConversionError
from finetune import data as ftdata
from finetune.model import load_backbone

__all__ = ["add_common_args", "command_parser", "prepare", "main"]


# ---------------------------------------------------------------- command line (shared with linprobe)
def _int_list(text: str) -> List[int]:
    value = parse_value(text)
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(v, int) for v in value):
        raise argparse.ArgumentTypeError(f"expected four integers like [2, 2, 6, 2], got {text!r}")
    return list(value)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="FCMAE checkpoint, converted weights (.pth / .safetensors), or none")
    p.add_argument("--data_path", default=None, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--demo", action="store_true", help="the fine-tuning demo set (configs/finetune/demo.yaml)")
    p.add_argument("--size", default=None, help="model size (default: the checkpoint's; atto for none)")
    p.add_argument("--depths", type=_int_list, default=None, help="custom depths (tests), e.g. '[1, 1, 1, 1]'")
    p.add_argument("--dims", type=_int_list, default=None, help="custom dims (tests), e.g. '[8, 16, 16, 16]'")
    p.add_argument("--input_size", type=int, default=None, help="image side (default 224; demo: 64)")
    p.add_argument("--crop_pct", type=float, default=None, help="resize to input_size / crop_pct, centre crop "
                                                                 "(default 0.875; demo 1.0)")
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
    """Input size, crop and root of the data, from the flags (and configs/finetune/demo.yaml with --demo)."""

    if args.demo == (args.data_path is not None):
        raise UsageError("give exactly one of --data_path D (with train/<class>/ and val/<class>/) and --demo")
    cfg = {"input_size": 224, "crop_pct": 0.875}
    if args.demo:
        folder = config_root() / "finetune"
        cfg = load_config([folder / "defaults.yaml", folder / "demo.yaml"])
    for key in ("input_size", "crop_pct"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["input_size"] < 32 or cfg["input_size"] % 32:
        raise UsageError(f"--input_size must be a positive multiple of 32, got {cfg['input_size']}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")

    cfg["root"] = ftdata.demo_root(cfg) if args.demo else Path(args.data_path).expanduser()
    return cfg


def prepare(args):
    """(dist info, frozen model, train loader, val loader, classes) for this rank; bad input fails before compute."""

    cfg = data_config(args)
    classes = labelled.check_splits(cfg["root"])
    if len(classes) < 2:
        raise UsageError(f"{cfg['root']} has {len(classes)} class; kNN and linear probing need at least 2")
    model = load_backbone(args.checkpoint, args.size, args.depths, args.dims, seed=args.seed)
    try:
        info = distributed.init_distributed(args.device)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    train_loader, val_loader = make_loaders(cfg["root"], classes, cfg["input_size"], cfg["crop_pct"], args.batch_size,
                                            args.num_workers, info.rank, info.world_size, info.device)
    return info, model.to(info.device), train_loader, val_loader, classes, cfg


def describe(args, model, classes, cfg, loaders) -> str:
    depths, dims = model.arch
    images = [len(loader.dataset) for loader in loaders]
    return (f"model  {args.checkpoint} (depths {list(depths)}, dims {list(dims)})\n"
            f"data   {cfg['root']}: {len(classes)} classes, {images[0]} train / {images[1]} val images at "
            f"{cfg['input_size']}x{cfg['input_size']}")


def run_command(prog: str, body, argv=None, build_parser=None) -> None:
    """Parse, run `body(args)`, print bad input as one line (exit 2); shared by fcmae-knn and fcmae-linprobe."""

    args = build_parser().parse_args(argv)

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
        print(f"knn    k={args.k} T={args.temperature}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({result['count']} val images)", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> None:
    run_command("fcmae-knn", knn_main, argv, build_parser)


if __name__ == "__main__":
    main()
