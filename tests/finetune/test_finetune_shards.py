"""Labelled WebDataset shards for fine-tuning, --eval, fcmae-knn, fcmae-linprobe and the kNN monitor
(fcmae/data/labelled_splits.py): the same images as a class folder give the same evaluation, fine-tuning on them
trains and resumes its stream, and bad shards are one-line errors."""

import json
import random
import re
import tarfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms

from fcmae.data.labelled_splits import ShardSplits, eval_loader, eval_set, find_labelled_data, val_spec_text
from fcmae.data.shard_sets import LabelError, LabelledShards
from fcmae.eval import knn as knn_core
from fcmae.model import build_fcmae
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.logs import read_jsonl
from finetune import knn, linprobe
from finetune import main_finetune as ft
from tests.helpers import TINY_ARGS, randomize_

CLASSES = ("cat", "dog", "owl")
SUFFIX = {"png": "png", "png16": "png", "jpg": "jpg"}


# ---------------------------------------------------------------- the data: a class folder and its shards
def write_class_folder(root: Path, per_class=(4, 2), kind: str = "png", size: int = 48, seed: int = 0) -> Path:
    """root/train/<class>/ and root/val/<class>/ of `kind` images ('png': 8-bit RGB, 'jpg', 'png16': 16-bit
    grey), each class with its own mean brightness plus noise."""
    rng = np.random.RandomState(seed)
    for split, count in zip(("train", "val"), per_class):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                level = 0.25 + 0.25 * label
                if kind == "png16":
                    pixels = ((level + 0.2 * rng.rand(size, size)).clip(0, 1) * 65535).astype(np.uint16)
                else:
                    pixels = ((level + 0.2 * rng.rand(size, size, 3)).clip(0, 1) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.{SUFFIX[kind]}",
                                             **({"quality": 90} if kind == "jpg" else {}))
    return root


def folder_to_shards(root: Path, out: Path, per_shard: int, seed: int = 0, info: bool = True,
                     classes=CLASSES, labels: Dict[str, int] = None) -> Path:
    """The shards of a class folder in the format of fcmae-make-shards (per split: shuffled samples, KEY.EXT the
    file's bytes, KEY.cls the class index, `split-NNNNNN.tar`), with an _info.json unless `info` is False.
    `labels`: `split/class/file name` -> a label written in its place (bad data)."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "val"):
        files = [(path, label) for label, name in enumerate(CLASSES)
                 for path in sorted((root / split / name).iterdir())]
        random.Random(seed).shuffle(files)
        names, lengths = [], []
        for start in range(0, len(files), per_shard):
            name = f"{split}-{start // per_shard:06d}.tar"
            with wds.TarWriter(str(out / name)) as writer:
                for n, (path, label) in enumerate(files[start:start + per_shard], start):
                    label = (labels or {}).get(f"{split}/{path.parent.name}/{path.name}", label)
                    writer.write({"__key__": f"{n:09d}", path.suffix[1:].lower(): path.read_bytes(),
                                  "cls": str(label).encode()})
            names.append(name)
            lengths.append(len(files[start:start + per_shard]))
        splits[split] = {"name": split, "num_samples": len(files), "filenames": names, "shard_lengths": lengths}
    if info:
        (out / "_info.json").write_text(json.dumps({"name": root.name, "fcmae_shards": 1, "classes": list(classes),
                                                    "splits": splits}))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(class folder, its shards): 3 classes, 4 + 2 8-bit PNGs of 48x48 each; shards of 4 samples."""
    tmp = tmp_path_factory.mktemp("photos")
    folder = write_class_folder(tmp / "folder")
    return folder, folder_to_shards(folder, tmp / "shards", per_shard=4)


def run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def tiny_finetune(data, out, *extra) -> List[str]:
    """One epoch of the tiny model from scratch on `data` into `out` (32-pixel crops, batches of 2)."""
    return ["atto", "none", "--data_path", str(data), "--output_dir", str(out), *TINY_ARGS, "--device", "cpu",
            "--num_workers", "0", "--input_size", "32", "--batch_size", "2", "--effective_batch", "2", "--epochs",
            "1", "--warmup_epochs", "0", "--model_ema", "false", "--print_every", "1", "--shuffle_buffer", "5",
            *extra]


def records(out: Path, kind: str, name: str = "log.jsonl") -> List[dict]:
    return [r for r in read_jsonl(out / name) if r.get("type") == kind]


# ---------------------------------------------------------------- what a data path names
def test_a_folder_of_train_and_val_shards_and_a_train_spec_name_both_splits(photos):
    folder, shards = photos
    data, classes = find_labelled_data(shards)
    assert isinstance(data, ShardSplits) and classes == list(CLASSES)
    assert (data.train.num_samples, data.val.num_samples) == (12, 6)
    assert [Path(u).name for u in data.val.urls] == ["val-000000.tar", "val-000001.tar"]
    spec, classes = find_labelled_data(f"{shards}/train-{{000000..000001}}.tar")
    assert [Path(u).name for u in spec.train.urls] == ["train-000000.tar", "train-000001.tar"]
    assert [Path(u).name for u in spec.val.urls] == ["val-000000.tar", "val-000001.tar"]
    assert (spec.train.num_samples, spec.val.num_samples, classes) == (8, 6, list(CLASSES))
    assert val_spec_text("pipe:cat /d/train/train-{0..3}.tar") == "pipe:cat /d/train/val-{0..3}.tar"
    data, classes = find_labelled_data(folder)  # class folders are not shards
    assert data == folder and classes == list(CLASSES)


# ---------------------------------------------------------------- evaluation reads what the folder holds
def samples_of(loaders) -> List[tuple]:
    """The (image bytes, label) of every sample the loaders give, sorted (the order differs between readers)."""
    return sorted((image.numpy().tobytes(), int(label)) for loader in loaders for images, labels in loader
                  for image, label in zip(images, labels))


@pytest.mark.parametrize("kind, in_chans, workers", [("png", 3, 0), ("jpg", 3, 0), ("png16", 1, 0), ("png", 3, 2)])
def test_evaluation_loaders_give_the_folders_images_and_labels_once_over_the_ranks(tmp_path, kind, in_chans, workers):
    """kNN, the linear probe, the monitor and fine-tuning's validation read shards through the same loaders:
    every sample once over 1 or 2 ranks (and their loader workers), decoded, cropped and normalised exactly as
    from the class folder."""
    folder = write_class_folder(tmp_path / "folder", kind=kind)
    shards = folder_to_shards(folder, tmp_path / "shards", per_shard=3)
    settings = dict(input_size=32, crop_pct=0.875, batch_size=4, num_workers=workers, in_chans=in_chans,
                    mean=[0.5] * in_chans, std=[0.25] * in_chans)
    data, classes = find_labelled_data(shards)
    want = [knn_core.make_loaders(folder, classes, **settings)]
    for ranks in (1, 2):
        got = [knn_core.make_loaders(data, classes, rank=rank, world_size=ranks, **settings) for rank in range(ranks)]
        for split in (0, 1):
            expected = samples_of([want[0][split]])
            assert len(expected) == (12, 6)[split]
            assert samples_of([loaders[split] for loaders in got]) == expected, (ranks, split)


# ---------------------------------------------------------------- bad shards
def unnamed_tars(shards: Path) -> Path:
    for path in shards.glob("*.tar"):
        path.rename(path.with_name(path.name.replace("train-", "a-").replace("val-", "b-")))
    return shards


@pytest.mark.parametrize("case, flags, message", [
    ("no_info", [], "name no classes (no _info.json with \"classes\" beside them): give --num_classes N"),
    ("no_val", [], "has no val shards (val-*.tar, or .tar files in val/): fine-tuning needs both"),
    ("spec_val_missing", [], "no validation shards for {spec} (fine-tuning reads them from {val_spec}"),
    ("unnamed", [], "holds .tar files but none named train-*.tar or val-*.tar"),
    ("label", [], "has label 7, outside the 3 classes (0..2)"),
    ("num_classes", ["--num_classes", "5"], "num_classes is 5 but the shards at {shards} have 3 classes"),
])
def test_bad_labelled_shards_are_one_line_before_training(tmp_path, capsys, case, flags, message):
    folder = write_class_folder(tmp_path / "folder", per_class=(3, 1))
    relabel = {"val/owl/000.png": 7} if case == "label" else {}  # a class that does not exist
    shards = folder_to_shards(folder, tmp_path / "shards", per_shard=3, info=case != "no_info", labels=relabel)
    data = shards
    if case == "no_val":
        for path in shards.glob("val-*.tar"):
            path.unlink()
    if case == "spec_val_missing":  # 3 train shards, 1 val shard
        data = f"{shards}/train-{{000000..000002}}.tar"
    if case == "unnamed":
        unnamed_tars(shards)
    message = message.format(shards=shards, spec=data, val_spec=f"{shards}/val-{{000000..000002}}.tar")
    code, out, err = run_main(ft.main, tiny_finetune(data, tmp_path / "out", *flags), capsys)
    assert code == 2 and err.startswith("fcmae-finetune: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()
    if case == "label":  # the sample named is the one relabelled
        shard, member = re.search(r"sample (\S+\.tar):(\d+)\.png has", err).groups()
        with tarfile.open(shard) as tar:
            assert tar.extractfile(f"{member}.cls").read() == b"7"
            assert tar.extractfile(f"{member}.png").read() == (folder / "val" / "owl" / "000.png").read_bytes()


def test_shards_without_info_train_with_num_classes_and_train_num_samples(tmp_path, capsys):
    """Without _info.json the class count and the epoch's samples are given; the plan uses them."""
    folder = write_class_folder(tmp_path / "folder", per_class=(3, 1))
    shards = folder_to_shards(folder, tmp_path / "shards", per_shard=3, info=False)
    argv = tiny_finetune(shards, tmp_path / "out", "--dry_run")
    code, out, err = run_main(ft.main, argv, capsys)
    assert code == 2 and "give --num_classes N" in err, err
    code, out, err = run_main(ft.main, argv + ["--num_classes", "3"], capsys)
    assert code == 2 and "give --train_num_samples N" in err, err
    code, out, err = run_main(ft.main, argv + ["--num_classes", "3", "--train_num_samples", "8"], capsys)
    assert code == 0, err
    assert "3 classes" in out and "(3 train, 1 val)" in out and "per epoch        8 of 8 images" in out, out


def test_a_label_outside_the_classes_in_the_training_stream_stops_the_run(tmp_path):
    """A sample whose label is not one of the classes is not an unreadable image to skip: the run stops naming
    it (here the probe's samples pass: the class count is lowered after the set is made)."""
    folder = write_class_folder(tmp_path / "folder", per_class=(3, 1))
    spec = find_labelled_data(folder_to_shards(folder, tmp_path / "shards", per_shard=3))[0].train
    stream = LabelledShards(spec, 9, 3, buffer=4)
    stream.split_epochs(batch_size=3, samples_per_rank=9, rank=0, ranks=1, workers=0)
    stream.num_classes = 2
    with pytest.raises(LabelError, match=r"train-00000\d\.tar:0000000\d\d\.png has label 2, outside the 2 classes"):
        for _ in stream:
            pass


def test_a_label_outside_the_classes_in_evaluation_is_one_line_from_a_loader_worker(tmp_path):
    """Evaluation's loader workers raise it as the same one-line error (every rank then stops: finetune.engine)."""
    folder = write_class_folder(tmp_path / "folder", per_class=(1, 3))
    data, classes = find_labelled_data(folder_to_shards(folder, tmp_path / "shards", per_shard=3))
    val = eval_set(data, "val", classes)
    val.num_classes, val.transform = 2, transforms.ToTensor()
    with pytest.raises(LabelError) as error:
        for _ in eval_loader(val, batch_size=2, num_workers=2):
            pass
    assert re.fullmatch(r"sample \S+/val-00000[012]\.tar:0000000\d\d\.png has label 2, outside the 2 classes "
                        r"\(0\.\.1\)", str(error.value)), str(error.value)


# ---------------------------------------------------------------- fine-tuning and --eval on shards
def finetune_quietly(argv) -> tuple:
    """(exit code, stdout) of one fine-tuning run (for module fixtures, which cannot use capsys)."""
    text = StringIO()
    with redirect_stdout(text), pytest.raises(SystemExit) as e:
        ft.main(argv)
    return e.value.code, text.getvalue()


@pytest.fixture(scope="module")
def finetuned(photos, tmp_path_factory):
    """One epoch of fine-tuning on the photos' shards: (its output folder, its stdout)."""
    out = tmp_path_factory.mktemp("finetuned") / "out"
    code, text = finetune_quietly(tiny_finetune(photos[1], out))
    assert code == 0, text
    return out, text


def evaluate_both(folder: Path, shards: Path, checkpoint: Path, tmp_path: Path, *flags) -> List[dict]:
    """The eval.jsonl records of --eval of `checkpoint` on the shards and on the class folder."""
    results = []
    for name, data in (("shards", shards), ("folder", folder)):
        code, text = finetune_quietly(tiny_finetune(data, tmp_path / name, "--eval", "true", "--resume",
                                                    str(checkpoint), *flags))
        assert code == 0, text
        results.append(records(tmp_path / name, "eval", "eval.jsonl")[-1])
    return results


@pytest.mark.slow
def test_finetuning_on_shards_reports_top1_and_eval_equals_the_folders(photos, finetuned, tmp_path):
    """The strongest check: the checkpoint fine-tuned on shards, evaluated with --eval on the val shards and on a
    class folder of the same images, gets the same top-1 and loss (and the same as its epoch's validation)."""
    folder, shards = photos
    out, text = finetuned
    epoch = records(out, "epoch")
    assert len(epoch) == 1 and epoch[0]["step"] == 6 and "acc1" in epoch[0]  # 12 samples in batches of 2
    assert "(3 train, 2 val)" in text and "all 6 images of the val shards of" in text
    assert f"val top-1 {epoch[0]['acc1']:.2f}%" in text
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (saved["stream"]["epoch"], saved["stream"]["batch"], saved["classes"]) == (1, 0, list(CLASSES))
    on_shards, on_folder = evaluate_both(folder, shards, out / "checkpoint-last.pth", tmp_path)
    assert on_shards["model_count"] == on_folder["model_count"] == 6
    assert on_shards["model_acc1"] == on_folder["model_acc1"] == epoch[0]["acc1"]
    assert on_shards["model_loss"] == pytest.approx(on_folder["model_loss"], rel=1e-5)
    assert on_shards["model_loss"] == pytest.approx(epoch[0]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_16_bit_grey_shards_with_in_chans_1(tmp_path):
    """16-bit 1-channel PNG shards: fine-tuning computes the normalisation from the shards and stores it; --eval
    on the shards and on the class folder agree."""
    folder = write_class_folder(tmp_path / "folder", kind="png16")
    shards = folder_to_shards(folder, tmp_path / "shards", per_shard=4)
    code, text = finetune_quietly(tiny_finetune(shards, tmp_path / "out", "--in_chans", "1"))
    assert code == 0, text
    assert "12 training images of 1 channel(s) of uint16" in text and "channel statistics from" in text
    saved = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    assert len(saved["config"]["mean"]) == 1
    on_shards, on_folder = evaluate_both(folder, shards, tmp_path / "out" / "checkpoint-last.pth", tmp_path)
    assert on_shards["model_count"] == on_folder["model_count"] == 6
    assert on_shards["model_acc1"] == on_folder["model_acc1"] == records(tmp_path / "out", "epoch")[0]["acc1"]
    assert on_shards["model_loss"] == pytest.approx(on_folder["model_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_the_stream_exactly(tmp_path):
    """Two loader workers reading 4 shards: a run pre-empted after 2 of its 6 steps and resumed ends with the
    weights of an uninterrupted run (the same samples, in the same order, with the same augmentation)."""
    folder = write_class_folder(tmp_path / "folder")
    shards = folder_to_shards(folder, tmp_path / "shards", per_shard=3)  # 4 train shards of 3
    run = ["--num_workers", "2", "--blr", "0.1"]
    assert finetune_quietly(tiny_finetune(shards, tmp_path / "clean", *run))[0] == 0
    assert finetune_quietly(tiny_finetune(shards, tmp_path / "cut", *run, "--exit_after_steps", "2"))[0] == 0
    saved = torch.load(tmp_path / "cut" / "checkpoint-last.pth", weights_only=True)
    assert saved["step"] == 2 and saved["stream"]["batch"] == 2 and saved["stream"]["workers"] == 2
    assert saved["stream"]["samples_read"] == [[2, 2]]  # batch 0 from worker 0, batch 1 from worker 1
    code, text = finetune_quietly(tiny_finetune(shards, tmp_path / "cut", *run))
    assert code == 0 and "the checkpoint read its shards with" not in text, text
    clean, resumed = (torch.load(tmp_path / name / "checkpoint-last.pth", weights_only=True)
                      for name in ("clean", "cut"))
    assert resumed["step"] == clean["step"] == 6
    for key, value in clean["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.slow
def test_mixup_with_the_last_batch_kept_gets_even_batches_from_the_stream(tmp_path):
    """11 training samples, batches of 4, Mixup, --drop_last false: the plan keeps 10 (an even last batch) and the
    stream gives batches of 4, 4 and 2 (an odd one would stop timm's Mixup)."""
    folder = write_class_folder(tmp_path / "folder")
    (folder / "train" / "owl" / "003.png").unlink()
    shards = folder_to_shards(folder, tmp_path / "shards", per_shard=4)
    code, text = finetune_quietly(tiny_finetune(shards, tmp_path / "out", "--mixup", "0.8", "--drop_last", "false",
                                                "--batch_size", "4", "--effective_batch", "4"))
    assert code == 0, text
    assert "10 of 11 images in 3 batches of 4, the last of 2" in text, text
    assert [r["step"] for r in records(tmp_path / "out", "epoch")] == [3]


@pytest.mark.slow
def test_a_checkpoint_from_before_shuffle_buffer_resumes(photos, tmp_path):
    """Checkpoints written before the shard settings existed store no shuffle_buffer: they resume (trained as with
    the default 1000), instead of stopping on a changed setting."""
    argv = tiny_finetune(photos[0], tmp_path / "out", "--shuffle_buffer", "1000")
    assert finetune_quietly(argv + ["--exit_after_steps", "2"])[0] == 0
    saved = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=False)
    del saved["config"]["shuffle_buffer"]
    torch.save(saved, tmp_path / "out" / "checkpoint-last.pth")
    code, text = finetune_quietly(argv)
    assert code == 0, text
    assert [r["step"] for r in records(tmp_path / "out", "epoch")] == [6]


# ---------------------------------------------------------------- fcmae-knn, fcmae-linprobe and the monitor
KNN_RUN = ["none", *TINY_ARGS, "--device", "cpu", "--num_workers", "0", "--input_size", "32", "--crop_pct", "1.0",
           "--batch_size", "4", "--seed", "3"]


@pytest.mark.slow
def test_knn_on_shards_equals_knn_on_the_folder_and_linprobe_runs(photos, capsys):
    folder, shards = photos
    lines = {}
    for name, data in (("folder", folder), ("shards", shards)):
        code, out, err = run_main(knn.main, [*KNN_RUN, "--data_path", str(data)], capsys)
        assert code == 0, err
        assert "3 classes, 12 train / 6 val images at 32x32" in out
        lines[name] = [line for line in out.splitlines() if line.startswith("knn ")]
    assert len(lines["folder"]) == 1 and lines["shards"] == lines["folder"]
    assert "(6 val images at 32x32" in lines["shards"][0]
    code, out, err = run_main(linprobe.main, [*KNN_RUN, "--data_path", str(shards), "--epochs", "5",
                                              "--warmup_epochs", "1", "--head_batch_size", "4"], capsys)
    assert code == 0, err
    assert "cached 16-d features of the 12 training and 6 validation images" in out
    assert re.search(r"linprobe  top-1 \d+\.\d\d%  \(6 val images at 32x32", out), out


def test_knn_on_shards_without_classes_takes_num_classes(photos, tmp_path, capsys):
    shards = folder_to_shards(photos[0], tmp_path / "shards", per_shard=4, info=False)
    code, out, err = run_main(knn.main, [*KNN_RUN, "--data_path", str(shards)], capsys)
    assert code == 2 and "name no classes" in err and "give --num_classes N" in err, err
    code, out, err = run_main(knn.main, [*KNN_RUN, "--data_path", str(shards), "--num_classes", "3"], capsys)
    assert code == 0, err
    assert "3 classes, ? train / ? val images" in out and "(6 val images at 32x32" in out


def monitor_settings(knn_data_path) -> SimpleNamespace:
    """The PretrainConfig settings KnnMonitor.from_config reads."""
    return SimpleNamespace(knn_data_path=str(knn_data_path), data_path="/images", input_size=32, in_chans=3,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), layout="auto", knn_every=1, knn_k=5,
                           knn_temperature=0.07, batch_size=4, num_workers=0, amp="off")


def test_the_pretraining_knn_monitor_reads_shards_as_the_folder(photos):
    folder, shards = photos
    model = randomize_(build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                   decoder_dim=16), 3)
    monitors = [knn_core.KnnMonitor.from_config(monitor_settings(data), DistInfo()) for data in (folder, shards)]
    assert "3 classes, 12 train / 6 val images at 32x32" in monitors[1].describe()
    assert str(shards) in monitors[1].describe()
    on_folder, on_shards = (monitor.evaluate(model) for monitor in monitors)
    assert on_shards == on_folder and on_shards["count"] == 6
