"""Fine-tuning's step, and the evaluation of a classifier: top-1 / top-5, exact over all processes.

The training loop is shared with pre-training (fcmae.runtime.trainer.Trainer):
it runs `ClassificationStep` once per iteration.
"""

from typing import Dict, Tuple

import torch

from fcmae.data.image_io import UnreadableImageError
from fcmae.eval.knn import has_top5
from fcmae.runtime import distributed
from fcmae.runtime.device import autocast_context


class ClassificationStep:
    """(model, (images, targets)) -> the loss of a batch: to the device, Mixup/CutMix, forward, criterion.

    Args:
        criterion: the loss (soft-target cross-entropy with Mixup, label smoothing, or plain).
        mixup: timm's Mixup/CutMix, or None.
        device: the device of this process.
    """

    def __init__(self, criterion: torch.nn.Module, mixup, device: torch.device):
        self.criterion, self.mixup, self.device = criterion, mixup, device

    def __call__(self, model: torch.nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off") -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole (sharded) validation set.

    Returns {"acc1", "acc5", "loss", "count"}; "acc5" only with more than 5 classes (fcmae.eval.knn.has_top5:
    the model's `num_classes`, else the logits' width). An unreadable image (finetune.data) stops every
    process with its name.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    count = 0
    classes = getattr(model, "num_classes", None)  # timm's classifiers have it
    error = None
    try:
        for images, targets in loader:
            size, width = _evaluate_batch(model, images, targets, device, amp, sums)
            count += size
            classes = classes or width
    except UnreadableImageError as e:  # met by this rank alone: the others must not wait for it below
        error = e
    distributed.raise_first_error(error)
    sums = torch.cat([sums, sums.new_tensor([count])])
    if distributed.is_dist():
        if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
            sums = sums.cuda()
        torch.distributed.all_reduce(sums)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    top5 = {"acc5": 100.0 * top5 / count} if classes and has_top5(classes) else {}
    return {"acc1": 100.0 * top1 / count, **top5, "loss": loss / count, "count": int(count)}


def _evaluate_batch(model: torch.nn.Module, images, targets, device: torch.device, amp: str,
                    sums: torch.Tensor) -> Tuple[int, int]:
    """Adds the batch's loss sum, top-1 and top-5 hits to `sums`; returns its size and the number of classes."""
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    with autocast_context(device, amp):
        logits = model(images)
    logits = logits.float()
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
    sums += torch.stack([
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum"),
        hits[:, 0].sum(),
        hits.any(dim=1).sum(),
    ]).double()
    return len(targets), logits.shape[1]
