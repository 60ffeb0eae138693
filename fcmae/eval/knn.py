"""Weighted k-nearest-neighbour accuracy of frozen encoder features, and the kNN monitor of pre-training.

Features: the encoder's last stage, global-average-pooled, unmasked,
L2-normalised. Each validation image votes with its k nearest training
images (cosine similarity), each weighted by exp(similarity / T), as in
DINO (Caron et al., 2021); top-1 and top-5 are the share of validation
images whose class is among the 1 and 5 highest-voted classes (top-5 only
with more than 5 classes: `has_top5`).

Distributed: every rank extracts the features of its shard of train/ and
val/; the training features are gathered on every rank
(torch.distributed.all_gather), each rank classifies its own validation
shard and the correct counts are summed. One process works the same way
with no process group.

Users: `fcmae-knn` and `fcmae-linprobe` (finetune.knn, finetune.linprobe)
with timm's dense model, and `KnnMonitor`, which pre-training
(fcmae.pretrain.main) runs every `knn_every` epochs on the FCMAE encoder.
The labelled data, a folder or labelled shards, is read by
fcmae.data.labelled_splits (the readers fine-tuning evaluates with): every
image once, in order, centre-cropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fcmae.data import labelled
from fcmae.data.demo import demo_classification_folder
from fcmae.data.folder import DataError
from fcmae.data.image_io import UnreadableImageError
from fcmae.data.labelled_splits import LabelledData, ShardSplits, eval_loader, eval_set, find_labelled_data, split_size
from fcmae.data.stats import IMAGENET_MEAN, IMAGENET_STD
from fcmae.runtime import distributed
from fcmae.runtime.config import config_root, load_config
from fcmae.runtime.device import autocast_context
from fcmae.runtime.distributed import raise_first_error
from fcmae.runtime.errors import UsageError
from fcmae.runtime.logs import log

__all__ = ["extract_features", "gather_rows", "sum_over_ranks", "has_top5", "knn_classify", "knn_evaluate",
           "make_loaders", "KnnMonitor", "DEMO_SET", "EVAL_CROP_PCT"]

Encode = Callable[[torch.Tensor], torch.Tensor]

DEMO_SET = "demo"  # knn_data_path value: the labelled demo set that `fcmae-knn --demo` evaluates
EVAL_CROP_PCT = 0.875  # the monitor's centre crop on a real folder: resize to input_size / 0.875, crop input_size


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
    An unreadable image (finetune.data: never replaced by another) stops every process with its name.
    """

    feats, labels, error = [], [], None
    try:
        for images, targets in loader:
            out = encode(images.to(device, non_blocking=True)).float()
            if out.dim() == 4:
                out = out.mean(dim=(2, 3))
            feats.append(F.normalize(out, dim=1) if normalize else out)
            labels.append(torch.as_tensor(targets, device=device))
    except UnreadableImageError as e:  # met by this rank alone: the others must not wait for it in a collective
        error = e
    raise_first_error(error)
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
    """`values` summed over the ranks (as they are without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- the classifier
def has_top5(num_classes: int) -> bool:
    """Whether top-5 accuracy says anything: with 5 classes or fewer every image's class is among the best 5.

    The kNN, the linear probe and fine-tuning report top-5 (lines, records, TensorBoard) only when it does.
    """
    return num_classes > 5


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

    Returns {"top1", "top5", "count"} (the same on every rank; "top5" only when
    `has_top5(num_classes)`). Cost: one
    forward pass over train/ and val/ (split across ranks), the gathered
    training features (N x C floats per rank) and an M/world x N similarity
    product per rank, in chunks.
    """
    train_feats, train_labels = extract_features(encode, train_loader, device)
    val_feats, val_labels = extract_features(encode, val_loader, device)
    train_feats, train_labels = gather_rows(train_feats), gather_rows(train_labels)
    correct1, correct5 = knn_classify(train_feats, train_labels, val_feats, val_labels, num_classes, k, temperature)
    correct1, correct5, count = sum_over_ranks([correct1, correct5, val_feats.shape[0]], device)
    result = {"top1": 100.0 * correct1 / max(count, 1)}
    if has_top5(num_classes):
        result["top5"] = 100.0 * correct5 / max(count, 1)
    return {**result, "count": int(count)}


def make_loaders(root: LabelledData, classes: List[str], input_size: int, crop_pct: float, batch_size: int,
                 num_workers: int, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None,
                 in_chans: int = 3, mean=None, std=None, layout: str = "auto") -> Tuple[DataLoader, DataLoader]:
    """(train, val) loaders of this rank's part of the train and val splits: centre crops, no augmentation.

    `root` and `classes` come from `fcmae.data.labelled_splits.find_labelled_data` (which checks them): a folder
    with train/<class>/ and val/<class>/, or labelled shards; every image is seen by exactly one rank, each
    split read once, in order. The loaders draw
    nothing from torch's global RNG, so evaluating between training epochs
    leaves the training run's random stream as it was. in_chans, mean, std (None: ImageNet's) and layout:
    the images' format and normalisation, as in pre-training (docs/own-data.md).
    """

    settings = {"input_size": input_size, "crop_pct": crop_pct}
    mean, std = IMAGENET_MEAN if mean is None else mean, IMAGENET_STD if std is None else std
    data = root if isinstance(root, ShardSplits) else Path(root)
    loaders = []
    for split in ("train", "val"):
        dataset = eval_set(data, split, classes, in_chans=in_chans, layout=layout)
        dataset.transform = labelled.eval_transform(settings, mean, std, pil=dataset.uses_pil)
        loaders.append(eval_loader(dataset, batch_size, num_workers, rank, world_size,
                                   pin=device is not None and device.type == "cuda",
                                   generator=torch.Generator()))  # its worker seeds come from here
    return loaders[0], loaders[1]


# ---------------------------------------------------------------- the pre-training monitor
def demo_set() -> Tuple[Path, int, float]:
    """(root, input_size, crop_pct) of the labelled demo set, as `fcmae-knn --demo` evaluates it.

    Read from configs/finetune/defaults.yaml < demo.yaml; the set is built in
    the demo cache (fcmae.data.demo) on first use.
    """

    folder = config_root() / "finetune"
    cfg = load_config([folder / "defaults.yaml", folder / "demo.yaml"])
    root = demo_classification_folder(crop_size=cfg["demo_crop_size"], train_per_photo=cfg["demo_train_per_photo"],
                                      val_per_photo=cfg["demo_val_per_photo"])
    return root, int(cfg["input_size"]), float(cfg["crop_pct"])


class KnnMonitor:
    """Weighted kNN accuracy of the FCMAE encoder during pre-training, every `every` epochs and after the last.

    Args:
        root: the labelled folder (train/<class>/, val/<class>/) or shards, already checked.
        classes: its class names (`fcmae.data.labelled_splits.find_labelled_data`).
        every: epochs between evaluations.
        k, temperature: the weighted kNN's neighbours and vote temperature.
        input_size, crop_pct: images are resized to input_size / crop_pct and centre-cropped.
        batch_size, num_workers: of the feature-extraction loaders (per process).
        device: this process's device.
        amp: autocast mode on CUDA (as training: bf16 | fp16 | off).
        rank, world_size: this process's shard.
        data_format: in_chans, mean, std, layout of the images (`make_loaders`; default: 3-channel, ImageNet's).
    """

    def __init__(self, root: LabelledData, classes: List[str], every: int, k: int, temperature: float, input_size: int,
                 crop_pct: float, batch_size: int, num_workers: int, device: torch.device, amp: str = "off",
                 rank: int = 0, world_size: int = 1, data_format: Optional[Dict[str, Any]] = None):
        self.root, self.classes, self.every, self.k, self.temperature = root, classes, every, k, temperature
        self.input_size, self.crop_pct, self.device, self.amp = input_size, crop_pct, device, amp
        self.train_loader, self.val_loader = make_loaders(root, classes, input_size, crop_pct, batch_size,
                                                          num_workers, rank, world_size, device,
                                                          **(data_format or {}))

    @classmethod
    def from_config(cls, cfg, info) -> Optional["KnnMonitor"]:
        """The monitor a PretrainConfig asks for (None when off), its folder checked: UsageError when bad.

        `knn_data_path: demo` (configs/pretrain/schedules/demo.yaml) is the
        labelled demo set at its own size (what `fcmae-knn --demo` reads);
        it applies only to runs on the demo photographs, not to `--data_path`.
        Labelled shards need an _info.json that names their classes.
        """

        path = cfg.knn_data_path
        if path is None:
            return None
        if path == DEMO_SET and cfg.data_path:
            log("kNN monitor off: knn_data_path 'demo' is the demo photographs; with --data_path give "
                "--knn_data_path D (a folder with train/<class>/ and val/<class>/)")
            return None
        try:
            if path == DEMO_SET:
                if info.is_main:  # rank 0 builds the set once, the others then find it in the cache
                    demo_set()
                distributed.barrier()
                root, input_size, crop_pct = demo_set()
            else:
                root, input_size, crop_pct = path, cfg.input_size, EVAL_CROP_PCT  # a shard spec stays text

            root, classes = find_labelled_data(root, "the kNN monitor of pre-training", flag=None)
            if len(classes) < 2:
                raise DataError(f"{root} has {len(classes)} class; the kNN monitor needs at least 2")
            data_format = dict(in_chans=cfg.in_chans, mean=cfg.mean, std=cfg.std, layout=cfg.layout)  # resolved
            return cls(root, classes, cfg.knn_every, cfg.knn_k, cfg.knn_temperature, input_size, crop_pct,
                       cfg.batch_size, cfg.num_workers, info.device, cfg.amp, info.rank, info.world_size,
                       data_format)
        except DataError as e:
            raise UsageError(f"knn_data_path: {e}") from None

    def describe(self) -> str:
        images = ["?" if n is None else n for n in (split_size(loader.dataset)
                                                    for loader in (self.train_loader, self.val_loader))]
        return (f"kNN monitor: {self.root}: {len(self.classes)} classes, {images[0]} train / {images[1]} val "
                f"images at {self.input_size}x{self.input_size}; k={self.k}, T={self.temperature}, "
                f"{'every epoch' if self.every == 1 else f'every {self.every} epochs and after the last'}")

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether to evaluate after (1-based) `epoch` of `epochs`."""
        return epoch % self.every == 0 or epoch == epochs

    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        """{"top1", "top5", "count"} of `model.encoder` (an FCMAE without DDP), unmasked, in eval mode."""

        was_training = model.training
        model.eval()
        try:
            with autocast_context(self.device, self.amp):
                return knn_evaluate(model.encoder, self.train_loader, self.val_loader, self.device,
                                    len(self.classes), self.k, self.temperature)
        finally:
            model.train(was_training)

    def end_epoch(self, model: torch.nn.Module, epoch: int, epochs: int, step: int, jsonl, tb) -> str:
        """Evaluate when due, write a "knn" record to log.jsonl and knn/top1, knn/top5 to TensorBoard (top-5
        only with more than 5 classes: `has_top5`).

        Called on every rank (the features are gathered); returns the text for
        the epoch line ('' when not due).
        """
        if not self.due(epoch, epochs):
            return ""
        result = self.evaluate(model)
        top5 = {"top5": result["top5"]} if "top5" in result else {}
        jsonl.write({"type": "knn", "epoch": epoch, "step": step, "top1": result["top1"], **top5,
                     "count": result["count"], "k": self.k, "input_size": self.input_size, "crop_pct": self.crop_pct})
        tb.scalars({"top1": result["top1"], **top5}, step, prefix="knn/")
        tb.flush()
        return f", knn top-1 {result['top1']:.2f}%" + (f" top-5 {top5['top5']:.2f}%" if top5 else "")
