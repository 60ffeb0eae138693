"""One FCMAE pre-training step, and the end of an epoch: what the shared Trainer runs for this command.

A step (the Trainer calls `PretrainStep` once per iteration, under autocast):

    images = dataset.to_device(images, device)   # normalised floats; JPEGs decoded on the GPU with decode: gpu
    loss, pred, mask = model(images)              # FCMAE: a random mask per image, the sparse encoder on the
                                                  # visible patches, the decoder, the loss on the masked ones
    return loss                                   # the Trainer scales it, runs backward and steps the optimizer

Around it the Trainer (fcmae.runtime.trainer) sets the lr, counts skipped
images, accumulates gradients, agrees with the other processes on stopping
and saves checkpoints. After each epoch `EpochEnd` runs the kNN monitor,
writes the epoch's summary and draws the reconstruction picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from fcmae.data.folder import ImageFolderDataset
from fcmae.eval.knn import KnnMonitor
from fcmae.model import FCMAE
from fcmae.pretrain.config import PretrainConfig
from fcmae.pretrain.visualize import reconstruction_grid, save_png, with_titles
from fcmae.runtime.device import autocast_context
from fcmae.runtime.logs import log
from fcmae.runtime.report import epoch_line_timing
from fcmae.runtime.trainer import Trainer


class PretrainStep:
    """(model, images) -> the FCMAE loss of a batch: to the device, mask, forward, loss.

    Args:
        dataset: the training set; it knows how to put its batches on a device (decoding encoded JPEGs there).
        device: the device of this process.
    """

    def __init__(self, dataset: ImageFolderDataset, device: torch.device):
        self.dataset, self.device = dataset, device

    def __call__(self, model: torch.nn.Module, images) -> torch.Tensor:
        loss, _, _ = model(self.dataset.to_device(images, self.device))
        return loss


class EpochEnd:
    """After each epoch: the kNN monitor (when set), the epoch's summary record, the reconstruction picture.

    Args:
        trainer: the run's Trainer (its state, log.jsonl and TensorBoard).
        model: the FCMAE model without wrappers.
        cfg: the run's config.
        knn_monitor: the frozen-feature kNN evaluation, or None.
        fixed_images: the batch drawn in reconstruction.png (rank 0), or None.
    """

    def __init__(self, trainer: Trainer, model: FCMAE, cfg: PretrainConfig, knn_monitor: Optional[KnnMonitor],
                 fixed_images: Optional[torch.Tensor]):
        self.trainer, self.model, self.cfg = trainer, model, cfg
        self.knn_monitor, self.fixed_images = knn_monitor, fixed_images

    def __call__(self, epoch_loss: float) -> None:
        trainer, state, cfg = self.trainer, self.trainer.state, self.cfg
        # The kNN evaluation first: should it fail, nothing of the epoch's summary is written yet (the
        # Trainer saves the epoch's training and the run, started again, evaluates and writes it once).
        knn_text = "" if self.knn_monitor is None else self.knn_monitor.end_epoch(
            self.model, state.epoch + 1, cfg.epochs, state.step, trainer.jsonl, trainer.tb)
        summary = {"epoch": state.epoch + 1, "loss": epoch_loss, "step": state.step, **trainer.epoch_timing}
        state.history.append(summary)
        trainer.jsonl.write({"type": "epoch", **summary})
        trainer.tb.scalars({"epoch_loss": epoch_loss}, state.step, prefix="train/")
        log(f"epoch {state.epoch + 1}/{cfg.epochs} done: mean loss {epoch_loss:.4f}"
            f"{epoch_line_timing(trainer.epoch_timing)}{knn_text}")
        if self.fixed_images is not None:
            self.save_reconstruction(state.step, state.epoch + 1)

    def save_reconstruction(self, step: int, epoch: int) -> None:
        """The reconstruction picture of the fixed batch after `epoch` (1-based): reconstruction.png (titled:
        the epoch, and each column's content) and TensorBoard."""
        model, cfg, device = self.model, self.cfg, self.trainer.device
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast_context(device, cfg.amp):
            images = self.fixed_images.to(device)
            mask = model.random_mask(images, generator=torch.Generator(device=device).manual_seed(cfg.seed))
            _, pred, mask = model(images, mask)
        model.train(was_training)
        picture = with_titles(reconstruction_grid(model, images, mask, pred, mean=cfg.mean, std=cfg.std),
                              f"epoch {epoch} of {cfg.epochs}")
        save_png(picture, Path(cfg.output_dir) / "reconstruction.png")
        self.trainer.tb.image("reconstruction (original | masked | reconstruction | + visible)", picture, step)
        self.trainer.tb.flush()
