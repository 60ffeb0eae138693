"""Weighted k-nearest-neighbour evaluation of frozen encoder features.

    fcmae-knn CKPT --data_path D [--k 20] [--temperature 0.07] [--size SIZE]
    python -m finetune.knn CKPT --demo
    torchrun --nproc_per_node 8 -m finetune.knn CKPT --data_path /path/to/imagenet

CKPT is an FCMAE checkpoint, converted weights (.pth or .safetensors), or
`none` (random weights of --size, the baseline). D holds train/<class>/ and
val/<class>/ with the same classes.

Features: the encoder's last stage, global-average-pooled, unmasked,
L2-normalised. Each validation image votes with its k nearest training
images (cosine similarity), each weighted by exp(similarity / T), as in
DINO (Caron et al., 2021); top-1 and top-5 are the share of validation
images whose class is among the 1 and 5 highest-voted classes.

Distributed: every rank extracts the features of its shard of train/ and
val/; the training features are gathered on every rank
(torch.distributed.all_gather), each rank classifies its own validation
shard and the correct counts are summed. One process works the same way
with no process group. `knn_evaluate` is the function a pre-training
monitor calls with the FCMAE encoder.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fcmae.runtime.command import UsageError

__all__ = ["extract_features", "gather_rows", "knn_classify", "knn_evaluate", "make_loaders", "add_common_args",
           "prepare", "main"]

Encode = Callable[[torch.Tensor], torch.Tensor]


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------- features
@torch.no_grad()
def extract_features(encode: Encode, loader, device: torch.device, normalize: bool = True
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features (N, C) float32, labels (N,)) of the images `loader` yields, on `device`.

    `encode` maps an image batch (B, 3, H, W) to the last stage's map
    (B, C, h, w) (timm: `model.forward_features`; FCMAE: `model.encoder`,
    no mask) or to pooled (B, C) features; maps are averaged over h, w.
    """
    feats, labels = [], []
    for images, targets in loader:
        out = encode(images.to(device, non_blocking=True)).float()
        if out.dim() == 4:
            out = out.mean(dim=(2, 3))
        feats.append(F.normalize(out, dim=1) if normalize else out)
        labels.append(torch.as_tensor(targets, device=device))
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels).long()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` from every rank, concatenated in rank order (x itself without a process group).

    Ranks may hold different numbers of rows (shards differ by one); the
    trailing dimensions must agree.
    """
    if not _dist() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def sum_over_ranks(values: List[float], device: torch.device) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- the classifier
@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 256) -> Tuple[int, int]:
    """Numbers of test rows whose label is the top-1 / among the top-5 weighted kNN votes.

    A class counts for top-5 only with at least one vote (with k < 5
    neighbours of fewer classes, the remaining ranks are not guesses).

    Args:
        train_feats: (N, C) L2-normalised training features (the memory bank).
        train_labels: (N,) their classes.
        test_feats: (M, C) L2-normalised features to classify.
        test_labels: (M,) their true classes.
        num_classes: number of classes (top-5 becomes top-min(5, num_classes)).
        k: neighbours (min(k, N) are used).
        temperature: votes are exp(cosine similarity / temperature).
        chunk: test rows per similarity matrix (memory: chunk x N).
    """
    k = min(k, train_feats.shape[0])
    top = min(5, num_classes)
    correct1 = correct5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        feats, labels = test_feats[start:start + chunk], test_labels[start:start + chunk]
        sim, idx = (feats @ train_feats.T).topk(k, dim=1)
        votes = torch.zeros(feats.shape[0], num_classes, device=feats.device, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        score, pred = votes.topk(top, dim=1)
        hits = (pred == labels[:, None]) & (score > 0)  # a class without votes is no hit, whatever its rank
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    return correct1, correct5


def knn_evaluate(encode: Encode, train_loader, val_loader, device: torch.device, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> Dict[str, float]:
    """Weighted kNN top-1/top-5 (in %) of `encode`'s features; every rank passes its own shard loaders.

    A pre-training monitor passes `fcmae_model.encoder` (unwrapped from DDP,
    in eval mode: no drop path) and loaders from `make_loaders`; it restores
    train mode afterwards. Returns {"top1", "top5", "count"} (the same on
    every rank). Cost: one
    forward pass over train/ and val/ (split across ranks), the gathered
    training features (N x C floats per rank) and an M/world x N similarity
    product per rank, in chunks.
    """
    train_feats, train_labels = extract_features(encode, train_loader, device)
    val_feats, val_labels = extract_features(encode, val_loader, device)
    train_feats, train_labels = gather_rows(train_feats), gather_rows(train_labels)
    correct1, correct5 = knn_classify(train_feats, train_labels, val_feats, val_labels, num_classes, k, temperature)
    correct1, correct5, count = sum_over_ranks([correct1, correct5, val_feats.shape[0]], device)
    return {"top1": 100.0 * correct1 / max(count, 1), "top5": 100.0 * correct5 / max(count, 1), "count": int(count)}


# ---------------------------------------------------------------- command line (shared with linprobe)
def _int_list(text: str) -> List[int]:
    from fcmae.runtime.config import parse_value

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


def data_config(args) -> Dict:
    """Input size, crop and root of the data, from the flags (and configs/finetune/demo.yaml with --demo)."""
    from pathlib import Path

    from fcmae.runtime.config import config_root, load_config

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
    from finetune import data as ftdata

    cfg["root"] = ftdata.demo_root(cfg) if args.demo else Path(args.data_path).expanduser()
    return cfg


def prepare(args):
    """(dist info, frozen model, train loader, val loader, classes) for this rank; bad input fails before compute."""
    from fcmae.runtime import distributed
    from finetune import data as ftdata
    from finetune.model import load_backbone

    cfg = data_config(args)
    classes = ftdata.check_splits(cfg["root"])
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


def make_loaders(root, classes: List[str], input_size: int, crop_pct: float, batch_size: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None):
    """(train, val) loaders of this rank's shards of root/train and root/val: centre crops, no augmentation.

    `classes` comes from `finetune.data.check_splits(root)` (which checks the
    folder); every image is seen by exactly one rank.
    """
    from pathlib import Path

    from finetune import data as ftdata

    transform = ftdata.eval_transform({"input_size": input_size, "crop_pct": crop_pct})
    loaders = []
    for split in ("train", "val"):
        dataset = ftdata.LabelledFolder(Path(root) / split, classes, transform)
        sampler = ftdata.ShardSampler(len(dataset), rank, world_size)
        loaders.append(DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                  pin_memory=device is not None and device.type == "cuda"))
    return loaders[0], loaders[1]


def describe(args, model, classes, cfg, loaders) -> str:
    depths, dims = model.arch
    images = [len(loader.dataset) for loader in loaders]
    return (f"model  {args.checkpoint} (depths {list(depths)}, dims {list(dims)})\n"
            f"data   {cfg['root']}: {len(classes)} classes, {images[0]} train / {images[1]} val images at "
            f"{cfg['input_size']}x{cfg['input_size']}")


def run_command(prog: str, body, argv=None, build_parser=None) -> None:
    """Parse, run `body(args)`, print bad input as one line (exit 2); shared by fcmae-knn and fcmae-linprobe."""
    from fcmae.runtime import distributed
    from fcmae.data import DataError
    from finetune.convert import ConversionError

    args = build_parser().parse_args(argv)
    try:
        code = body(args)
    except (UsageError, DataError, ConversionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        distributed.cleanup()
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcmae-knn", description="Weighted kNN accuracy of frozen ConvNeXt V2 "
                                "features (global-average-pooled last stage, L2-normalised).")
    add_common_args(p)
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
