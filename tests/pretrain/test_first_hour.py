"""The first hour with one's own small folder, command by command: dry runs count the images, a bad start leaves
no folder behind, the epoch lines give the time, runs end with a summary and curves.png, reconstruction.png has
titles, fine-tuning may keep each epoch's last batch and never drops validation images."""

import re

import numpy as np
import pytest
import torch

from fcmae.pretrain import main as main_pretrain
from fcmae.pretrain.visualize import with_titles
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.logs import read_jsonl
from finetune import data as ftdata
from finetune import main_finetune as ft
from tests.eval.test_knn_linprobe import make_folder
from tests.eval.test_knn_monitor import shuffled_folder
from tests.helpers import CPU_ARGS, TINY_ARGS, tiny_args
from tests.pretrain.test_pretrain_run import run

# A tiny fine-tuning run on a labelled folder (see `labelled`).
FT = [*TINY_ARGS, *CPU_ARGS, "--input_size", "32", "--batch_size", "4", "--effective_batch", "4", "--epochs", "2",
      "--warmup_epochs", "0", "--model_ema", "false", "--print_every", "1", "--aa", "none"]


def exits(main, argv, capsys):
    """(exit code, stdout, stderr) of a command run in-process."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture
def labelled(tmp_path):
    """train/: 5 red and 5 green images; val/: 3 red and 2 green (5: not a multiple of the batch)."""
    root = make_folder(tmp_path / "labelled", train={"red": 0, "green": 0}, val={"red": 0, "green": 0},
                       per_class=(5, 3))
    (root / "val" / "green" / "2.png").unlink()
    return root


# ---------------------------------------------------------------- dry runs count the images
def test_the_pretraining_dry_run_counts_the_images_and_what_each_epoch_leaves_out(image_dir, capsys):
    code, out, _ = exits(main_pretrain.main, ["atto", "small", "--data_path", str(image_dir), "--dry_run"], capsys)
    assert code == 0
    assert f"data             {image_dir / 'train'} (24 images)" in out
    assert "per epoch        16 of 24 images in 1 batch of 16; 8 left out each epoch (the last, partial batch" in out
    assert f"output           output/pretrain/atto_small_{image_dir.name}" in out


def test_the_finetuning_dry_run_counts_train_and_val_images(labelled, capsys):
    code, out, _ = exits(ft.main, ["atto", "none", "--data_path", str(labelled), "--config", "small", "--dry_run"],
                         capsys)
    assert code == 0
    assert "(10 training images)" in out and "2 classes" in out
    assert "effective batch lowered from 16 to 10" in out  # fewer images than one batch of the recipe
    assert "per epoch        10 of 10 images in 1 batch of 10" in out
    assert "validation       all 5 images of val/ after each epoch (none left out)" in out
    code, out, _ = exits(ft.main, ["atto", "none", "--data_path", str(labelled), "--batch_size", "4",
                                   "--effective_batch", "4", "--mixup", "0", "--cutmix", "0", "--dry_run"], capsys)
    assert "per epoch        8 of 10 images in 2 batches of 4; 2 left out each epoch" in out
    assert "--drop_last false trains on them too" in out
    code, out, _ = exits(ft.main, ["atto", "none", "--data_path", str(labelled), "--batch_size", "4",
                                   "--effective_batch", "4", "--mixup", "0", "--cutmix", "0", "--drop_last", "false",
                                   "--dry_run"], capsys)
    assert "per epoch        10 of 10 images in 3 batches of 4, the last of 2" in out


# ---------------------------------------------------------------- a bad start leaves nothing behind
def test_bad_input_before_training_leaves_no_output_folder(image_dir, labelled, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = exits(main_pretrain.main, tiny_args(tmp_path / "missing", runs / "a"), capsys)
    assert code == 2 and "does not exist" in err
    typo = str(tmp_path / "typo")
    code, _, err = exits(main_pretrain.main, tiny_args(image_dir, runs / "b", "--knn_data_path", typo), capsys)
    assert code == 2 and "knn_data_path" in err
    code, _, err = exits(ft.main, ["atto", "none", *FT, "--data_path", str(tmp_path / "missing"),
                                   "--output_dir", str(runs / "c")], capsys)
    assert code == 2
    code, _, err = exits(ft.main, ["atto", "none", *FT, "--data_path", str(labelled), "--eval", "--output_dir",
                                   str(runs / "d")], capsys)
    assert code == 2 and "needs a checkpoint" in err
    assert not runs.exists()


def test_a_bad_start_never_removes_a_folder_that_was_there(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"an earlier run's checkpoint")
    code, _, _ = exits(main_pretrain.main, tiny_args(tmp_path / "missing", out), capsys)
    assert code == 2 and (out / "checkpoint-last.pth").read_bytes() == b"an earlier run's checkpoint"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = exits(main_pretrain.main, tiny_args(image_dir, empty, "--knn_data_path", str(tmp_path / "no")),
                       capsys)
    assert code == 2 and empty.is_dir() and not any(empty.iterdir())  # no stray config.yaml either


# ---------------------------------------------------------------- what a run shows
def test_a_run_times_its_epochs_and_ends_with_a_summary_and_curves(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_args(image_dir, out, "--knn_data_path", str(shuffled_folder(tmp_path / "knn")), "--knn_every",
                         "1")) == 0
    text = capsys.readouterr().out
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}/2 done: mean loss [\d.]+, [\d.]+ s \(\d+ images/s\), knn top-1 ", text,
                         re.M), text
    epochs = [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "epoch"]
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 for r in epochs)
    summary = text[text.index("summary (from log.jsonl):"):]
    assert "epochs           2 (12 optimizer steps)" in summary
    assert re.search(r"time +[\d.]+ s per epoch, [\d.]+ images/s", summary)
    assert re.search(r"loss +[\d.]+ after epoch 1 -> [\d.]+ after epoch 2", summary)
    assert re.search(r"kNN top-1 +[\d.]+% after epoch 1 -> [\d.]+% after epoch 2", summary)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in summary and not (out / "curves.png").exists()
    else:
        assert f"curves           {out / 'curves.png'}" in summary and (out / "curves.png").is_file()


def test_the_reconstruction_picture_has_column_titles_and_the_epoch():
    grid = np.zeros((2 * 64 + 2, 4 * 64 + 3 * 2, 3), dtype=np.uint8)  # two black rows of four 64-pixel columns
    picture = with_titles(grid, "epoch 1 of 2")
    band = picture[:-grid.shape[0]]
    assert np.array_equal(picture[band.shape[0]:], grid) and band.shape[0] >= 20
    text_rows = band[12:]  # below the heading: the titles
    for column in range(4):
        assert (text_rows[:, column * 66:column * 66 + 64] < 128).any(), f"column {column} has no title"
    assert not np.array_equal(with_titles(grid, "epoch 2 of 2"), picture)


# ---------------------------------------------------------------- fine-tuning on a small folder
def steps_per_epoch(out):
    return [r["step"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "epoch"]


@pytest.mark.slow
def test_finetuning_keeps_the_last_batch_with_drop_last_false_and_ends_with_a_summary(labelled, tmp_path, capsys):
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    code, text, err = exits(ft.main, ["atto", "none", *FT, "--data_path", str(labelled), "--drop_last", "false",
                                      "--output_dir", str(kept)], capsys)
    assert code == 0, err
    assert steps_per_epoch(kept) == [3, 6]  # 10 images: 4 + 4 + 2
    assert re.search(r"^epoch 2/2 done: train loss [\d.]+, val top-1 [\d.]+%, [\d.]+ s \(\d+ images/s\)", text, re.M)
    assert re.search(r"val top-1 +[\d.]+% after epoch 1 -> [\d.]+% after epoch 2 \(best", text), text
    code, _, err = exits(ft.main, ["atto", "none", *FT, "--data_path", str(labelled), "--output_dir", str(dropped)],
                         capsys)
    assert code == 0, err
    assert steps_per_epoch(dropped) == [2, 4]  # whole batches: 2 images left out


def test_validation_evaluates_every_image_whatever_the_batch(labelled):
    cfg = ft.resolve_config(["atto", "none", *FT, "--data_path", str(labelled), "--batch_size", "4"])
    cfg, _, val = ftdata.prepare_data(cfg, labelled, ["green", "red"])
    model = ft._new_model(cfg, 2)
    loader = ftdata.val_loader(cfg, val, DistInfo(0, 1, 0, torch.device("cpu"), "gloo"))
    assert ft.evaluate(model, loader, torch.device("cpu"))["count"] == 5  # 4 + 1

