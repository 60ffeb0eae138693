"""Details of the training loop and its data that one process shows: the progress line's loss, EMA after a
resume, per-sample seeding of fine-tuning augmentation on each rank, GRN's fp16 accumulation."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.loader import train_loader
from fcmae.runtime.logs import read_jsonl
from finetune import main_finetune
from tests.helpers import CPU_ARGS, TINY_ARGS, write_images


def exits_0(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, f"{main.__module__} {argv} exited with {e.value.code}"


# ---------------------------------------------------------------- the progress line
def test_progress_loss_is_the_mean_over_the_optimizer_steps_micro_batches(image_dir, tmp_path, monkeypatch):
    micro_losses, real_build = [], main_pretrain.build_fcmae

    def recording_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward = model.forward

        def recording_forward(imgs, mask=None):
            loss, pred, mask = forward(imgs, mask)
            if model.training:
                micro_losses.append(loss.item())
            return loss, pred, mask

        model.forward = recording_forward
        return model

    monkeypatch.setattr(main_pretrain, "build_fcmae", recording_build)
    out = tmp_path / "out"
    # 24 images, 2 per iteration, 2 iterations per optimizer step: 6 steps.
    exits_0(main_pretrain.main, ["atto", "demo", "--data_path", str(image_dir), "--output_dir", str(out), *TINY_ARGS,
                                 *CPU_ARGS, "--decoder_dim", "16", "--input_size", "64", "--mask_ratio", "0.5",
                                 "--batch_size", "2", "--effective_batch", "4", "--epochs", "1",
                                 "--warmup_epochs", "0", "--print_every", "1", "--vis_images", "0"])
    logged = [r["loss"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
    assert len(logged) == 6 and len(micro_losses) == 12
    pairs = [(micro_losses[2 * i], micro_losses[2 * i + 1]) for i in range(6)]
    assert all(a != b for a, b in pairs)  # else the mean and the last micro-batch would agree
    assert logged == pytest.approx([(a + b) / 2 for a, b in pairs], rel=1e-6)


# ---------------------------------------------------------------- EMA after a resume
@pytest.mark.slow
def test_ema_turned_on_at_a_resume_starts_from_the_restored_weights(tmp_path):
    for split, per_class in (("train", 8), ("val", 2)):
        for c in ("a", "b"):
            write_images(tmp_path / "data" / split / c, per_class, size=40, seed=ord(c))
    out = tmp_path / "out"
    common = ["atto", "none", "--data_path", str(tmp_path / "data"), "--output_dir", str(out), *TINY_ARGS, *CPU_ARGS,
              "--input_size", "32", "--batch_size", "4", "--effective_batch", "4", "--epochs", "1",
              "--warmup_epochs", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0"]
    exits_0(main_finetune.main, [*common, "--model_ema", "false", "--exit_after_steps", "2"])
    restored = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert restored["step"] == 2 and restored["ema"] is None
    # Resumed with EMA (decay 0.999) for one more step: EMA = 0.999 x its start + 0.001 x the step-3 weights.
    exits_0(main_finetune.main, [*common, "--model_ema", "true", "--model_ema_decay", "0.999",
                                 "--exit_after_steps", "3", "--allow_config_change", "true"])
    final = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert final["step"] == 3
    for name, start in restored["model"].items():
        if not start.is_floating_point():
            continue
        step = (final["model"][name] - start).abs().max()
        assert (final["ema"][name] - start).abs().max() <= 0.01 * step + 1e-7, name


# ---------------------------------------------------------------- fine-tuning augmentation on each rank
class ChosenOps:
    """timm's RandAugment whose ops record their index instead of changing the image; returns the indices."""

    def __init__(self):
        from timm.data.auto_augment import rand_augment_transform

        self.augment = rand_augment_transform("rand-m9-mstd0.5-inc1", {})
        self.augment.ops = [functools.partial(self._record, i) for i in range(len(self.augment.ops))]
        self.chosen = []

    def _record(self, index, image):
        self.chosen.append(index)
        return image

    def __call__(self, image):
        self.chosen = []
        self.augment(image)
        return torch.tensor(self.chosen)


def chosen_ops(root: Path, rank: int, start_batch: int = 0) -> torch.Tensor:
    """The RandAugment ops of rank `rank`'s samples in epoch 0 (of 2 ranks), from batch `start_batch`, with a worker."""
    from fcmae.data.labelled import LabelledFolder

    dataset = LabelledFolder(root, ["a"], ChosenOps(), seed=0)
    loader = train_loader(dataset, SimpleNamespace(batch_size=2, images_per_epoch=12, keep_last=False), 1, 0,
                          DistInfo(rank, 2, rank, torch.device("cpu"), "gloo"))
    assert loader.generator.initial_seed() == rank  # seed + rank
    loader.sampler.set_epoch(0, start_batch=start_batch)
    dataset.set_epoch(0)
    return torch.cat([ops for ops, _ in loader])


def test_randaugment_choices_differ_between_ranks_and_repeat_after_a_resume(tmp_path):
    write_images(tmp_path / "a", 12, size=16)
    rank0, rank1 = chosen_ops(tmp_path, 0), chosen_ops(tmp_path, 1)
    assert rank0.shape == rank1.shape == (6, 2)  # 3 batches of 2 samples, 2 ops each
    assert not torch.equal(rank0, rank1), "the ranks chose the same RandAugment ops in lockstep"
    resumed = chosen_ops(tmp_path, 1, start_batch=1)  # a fresh loader, as after a mid-epoch resume
    assert torch.equal(resumed, rank1[2:]), "a resumed run augments its samples differently"


# ---------------------------------------------------------------- GRN of the MinkowskiEngine backend
def test_minkowski_grn_norm_accumulates_fp16_features_in_fp32():
    """Pure torch (the reduction is factored out of the ME code): runs whether or not ME is installed."""
    from sparse.minkowski import per_image_l2_rows

    # Image 0: 1,254 sites of magnitude 8 (sum of squares 80,256 > fp16's 65,504); image 1: small values.
    x = torch.cat([torch.full((1254, 3), 8.0), torch.full((10, 3), 0.5)])
    x[:, 1] *= -1
    batch_index = torch.cat([torch.zeros(1254, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    expected = per_image_l2_rows(x, batch_index, 2)
    torch.testing.assert_close(expected[0], torch.full((3,), (1254 * 64) ** 0.5))
    half = per_image_l2_rows(x.half(), batch_index, 2)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), expected, rtol=1e-3, atol=0)


# ---------------------------------------------------------------- checkpoints are memory-mapped
def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc to read resident memory")
def test_checkpoints_load_memory_mapped_so_ranks_of_a_node_share_the_pages(tmp_path):
    import argparse

    path = tmp_path / "checkpoint-last.pth"
    ckpt.save_atomic({"model": {"w": torch.ones(2 ** 24)}, "args": argparse.Namespace(lr=1.0)}, path)
    before = resident_mb()
    saved = ckpt.load_checkpoint(path)  # 64 MiB of tensors
    assert resident_mb() - before < 16, "the load read the whole file into memory"
    assert saved["args"].lr == 1.0 and saved["model"]["w"].sum().item() == 2 ** 24
