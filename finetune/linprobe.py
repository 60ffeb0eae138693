"""Linear probing: a linear classifier trained on frozen, cached encoder features.

    fcmae-linprobe CKPT --data_path D [--epochs 90] [--blr 0.1] [--batch_size 256]
    python -m finetune.linprobe CKPT --demo
    torchrun --nproc_per_node 8 -m finetune.linprobe CKPT --data_path /path/to/imagenet

CKPT and D as for fcmae-knn (finetune.knn). The head is MAE's
(He et al., 2022): BatchNorm1d without affine parameters, then a Linear
layer (weights drawn with std 0.01, zero bias), on the global-average-pooled
last stage. The frozen encoder runs once: the features of train/ and val/
(centre crops, no augmentation) are cached in memory, and the head is then
trained for many fast epochs on them with SGD (momentum 0.9, no weight
decay), lr = blr x global batch / 256, linear warm-up then cosine decay.

Distributed: each rank caches the features of its shard and the head is
trained with DistributedDataParallel (gradients averaged; BatchNorm
statistics of rank 0 broadcast, as in MAE's linear probing); every rank
takes the same number of steps per epoch. Validation counts are summed
over the ranks.
"""

from __future__ import annotations

if __name__ == "__main__":  # first thing: a Ctrl-C while the modules below load is one line, not a traceback
    from fcmae.runtime.signals import quiet_ctrl_c

    quiet_ctrl_c()

import argparse
import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from fcmae.eval.knn import extract_features, has_top5, sum_over_ranks
from fcmae.runtime.errors import UsageError
from finetune.knn import command_parser, describe, evaluated_at, prepare, run_command

__all__ = ["LinearProbe", "train_probe", "evaluate_probe", "main"]


class LinearProbe(nn.Sequential):
    """BatchNorm1d(affine=False) -> Linear, MAE's linear-probing head."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def lr_at(step: float, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up over `warmup` steps, then half-cosine to 0 at `total`."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 90, batch_size: int = 256,
                blr: float = 0.1, warmup_epochs: int = 10, seed: int = 0, log=None) -> LinearProbe:
    """Train a `LinearProbe` on cached features (this rank's shard; DDP when a process group exists).

    Args:
        feats: (N_rank, C) features of this rank's training images.
        labels: (N_rank,) their classes.
        num_classes: outputs of the head.
        epochs: passes over the (global) training set.
        batch_size: rows per step per rank; the global batch is batch_size x world size.
        blr: base learning rate; lr = blr x global batch / 256.
        warmup_epochs: epochs of linear warm-up.
        seed: seeds the head's initialisation and the order of rows.
        log: optional callable(epoch, loss, lr) after every epoch.
    """

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    device = feats.device
    torch.manual_seed(seed)
    head = LinearProbe(feats.shape[1], num_classes).to(device)
    model = nn.parallel.DistributedDataParallel(head) if distributed else head
    global_rows = int(sum_over_ranks([feats.shape[0]], device)[0])
    steps_per_epoch = max(1, math.ceil(global_rows / (batch_size * world)))
    lr = blr * batch_size * world / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    model.train()
    for epoch in range(epochs):
        # Every rank takes steps_per_epoch steps: its shard in a new order, repeated as needed.
        repeats = math.ceil(steps_per_epoch * batch_size / max(feats.shape[0], 1))
        order = torch.cat([torch.randperm(feats.shape[0], generator=gen) for _ in range(repeats)]).to(device)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, total, warmup, lr)
            rows = order[step * batch_size:(step + 1) * batch_size]
            loss = criterion(model(feats[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        if log is not None:
            log(epoch + 1, float(loss_sum) / steps_per_epoch, optimizer.param_groups[0]["lr"])
    return head.eval()


@torch.no_grad()
def evaluate_probe(head: LinearProbe, feats: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1 / top-5 (in %) over the validation rows of all ranks; {"top1", "top5", "count"} ("top5" only with
    more than 5 classes: fcmae.eval.knn.has_top5)."""
    head.eval()
    logits = head(feats) if feats.shape[0] else torch.zeros(0, head[1].out_features, device=feats.device)
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = pred == labels[:, None]
    correct1, correct5, count = sum_over_ranks([float(hits[:, 0].sum()), float(hits.any(dim=1).sum()),
                                                feats.shape[0]], feats.device)
    result = {"top1": 100.0 * correct1 / max(count, 1)}
    if has_top5(logits.shape[1]):
        result["top5"] = 100.0 * correct5 / max(count, 1)
    return {**result, "count": int(count)}


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("fcmae-linprobe", "Linear probing (MAE-style: BatchNorm without affine, then Linear) on "
                       "frozen, cached ConvNeXt V2 features.")
    p.add_argument("--epochs", type=int, default=90, help="epochs of the linear head (default 90)")
    p.add_argument("--head_batch_size", type=int, default=256, help="rows per step per process (default 256)")
    p.add_argument("--blr", type=float, default=0.1, help="base lr; lr = blr x global batch / 256 (default 0.1)")
    p.add_argument("--warmup_epochs", type=int, default=10)
    p.add_argument("--print_every", type=int, default=10, help="epochs between progress lines")
    return p


def linprobe_main(args) -> int:
    if args.epochs < 1 or args.head_batch_size < 2 or args.blr <= 0 or not 0 <= args.warmup_epochs <= args.epochs:
        raise UsageError("--epochs must be >= 1, --head_batch_size >= 2 (BatchNorm), --blr > 0, "
                         "0 <= --warmup_epochs <= --epochs")
    info, model, train_loader, val_loader, classes, cfg = prepare(args, "fcmae-linprobe")
    if info.is_main:
        print(describe(args, model, classes, cfg, [train_loader, val_loader]), flush=True)
    train_feats, train_labels = extract_features(model.forward_features, train_loader, info.device, normalize=False)
    val_feats, val_labels = extract_features(model.forward_features, val_loader, info.device, normalize=False)
    if info.is_main:
        images = (f"this process's shards of train/ and val/ ({info.world_size} processes)" if info.world_size > 1
                  else f"the {len(train_feats)} training and {len(val_feats)} validation images")
        print(f"cached {train_feats.shape[1]}-d features of {images}; training the head", flush=True)

    def log(epoch, loss, lr):
        if info.is_main and (epoch % args.print_every == 0 or epoch == args.epochs):
            print(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  lr {lr:.4g}", flush=True)

    head = train_probe(train_feats, train_labels, len(classes), args.epochs, args.head_batch_size, args.blr,
                       args.warmup_epochs, args.seed, log)
    result = evaluate_probe(head, val_feats, val_labels)
    if info.is_main:
        top5 = f"  top-5 {result['top5']:.2f}%" if "top5" in result else ""  # more than 5 classes only
        print(f"linprobe  top-1 {result['top1']:.2f}%{top5}  ({result['count']} val images "
              f"at {evaluated_at(cfg)}, checkpoint {args.checkpoint})", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> None:
    run_command("fcmae-linprobe", linprobe_main, argv, build_parser)


if __name__ == "__main__":
    main()
