"""The kNN monitor of pre-training (fcmae/eval/knn.py's KnnMonitor, hooked into fcmae/pretrain/main.py's end_epoch):
what it logs and when, that it equals fcmae-knn on the same weights, that it leaves training untouched, bad
folders and settings, the demo set, and two processes."""

import os
import re
from pathlib import Path

import pytest
import torch

from fcmae.eval.knn import KnnMonitor
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.logs import read_jsonl
from tests.eval.test_knn_linprobe import make_folder, run_main
from tests.helpers import randomize_, tiny_args, write_images
from tests.pretrain.test_pretrain_run import expect_usage_error, run, train_losses


def shuffled_folder(root: Path) -> Path:
    """3 classes whose images share their patterns across classes: kNN accuracy is neither 0 nor 100%."""
    for label, name in enumerate(("a", "b", "c")):
        write_images(root / "train" / name, 6, size=40, seed=label)
        write_images(root / "val" / name, 4, size=40, seed=10 + label)
    return root


# A normalisation of the run's own (stored in its checkpoints), which fcmae-knn must take from the checkpoint.
NORM = ["--mean", "[0.5, 0.4, 0.3]", "--std", "[0.2, 0.25, 0.3]"]


def monitored(image_dir, knn_dir, out, *extra):
    return tiny_args(image_dir, out, "--epochs", "3", "--knn_data_path", str(knn_dir), "--knn_every", "2", *NORM,
                     *extra)


@pytest.fixture(scope="module")
def knn_run(image_dir, tmp_path_factory):
    """3 epochs with the monitor every 2 epochs (so after epochs 2 and 3), and its stdout."""
    tmp = tmp_path_factory.mktemp("knn_run")
    knn_dir, out = shuffled_folder(tmp / "knn"), tmp / "out"
    from contextlib import redirect_stdout
    from io import StringIO

    text = StringIO()
    with redirect_stdout(text):
        assert run(monitored(image_dir, knn_dir, out)) == 0
    return knn_dir, out, text.getvalue()


def test_monitor_logs_top1_after_the_right_epochs_and_top5_only_beyond_5_classes(knn_run):
    _, out, text = knn_run
    records = [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "knn"]
    assert [(r["epoch"], r["step"]) for r in records] == [(2, 12), (3, 18)]  # 6 steps per epoch
    # 3 classes: every image's class is among the best 5, so no top-5 anywhere
    assert all(0 <= r["top1"] <= 100 and "top5" not in r and r["count"] == 12 for r in records)
    assert "kNN monitor: " in text and "3 classes, 18 train / 12 val images at 64x64; k=20, T=0.07" in text
    epoch_lines = [line for line in text.splitlines() if re.match(r"epoch \d/3 done", line)]
    assert len(epoch_lines) == 3 and "knn" not in epoch_lines[0]
    for line, r in zip(epoch_lines[1:], records):
        assert f"knn top-1 {r['top1']:.2f}%" in line and "top-5" not in line

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("knn/top1")
    assert [s.step for s in scalars] == [12, 18]
    assert [s.value for s in scalars] == pytest.approx([r["top1"] for r in records])
    assert "knn/top5" not in events.Tags()["scalars"]


def test_monitor_equals_fcmae_knn_on_the_saved_weights(knn_run, capsys):
    """The last record is the kNN of the final weights: what fcmae-knn computes from checkpoint-last.pth, which
    takes the run's input size, crop and normalisation from the checkpoint (no flags repeated)."""
    from finetune import knn

    knn_dir, out, _ = knn_run
    last = [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "knn"][-1]
    assert 0 < last["top1"] < 100  # a case where wrong features would show
    assert (last["input_size"], last["crop_pct"]) == (64, 0.875)
    checkpoint = out / "checkpoint-last.pth"
    code, text, err = run_main(knn.main, [str(checkpoint), "--data_path", str(knn_dir), "--device", "cpu",
                                          "--num_workers", "0"], capsys)
    assert code == 0, err
    assert "mean [0.5, 0.4, 0.3], std [0.2, 0.25, 0.3]" in text
    assert (f"top-1 {last['top1']:.2f}%  (12 val images at 64x64, crop_pct 0.875, checkpoint {checkpoint})"
            in text and "top-5" not in text)  # 3 classes: no top-5
    # A flag that differs from the checkpoint wins, and says so.
    code, text, err = run_main(knn.main, [str(checkpoint), "--data_path", str(knn_dir), "--device", "cpu",
                                          "--num_workers", "0", "--input_size", "32"], capsys)
    assert code == 0, err
    assert f"note: input_size 32 as given, 64 in the checkpoint {checkpoint}; using 32" in text
    assert "val images at 32x32, crop_pct 0.875" in text


def test_monitor_leaves_the_training_run_as_it_was(knn_run, image_dir, tmp_path):
    """Same losses with and without the monitor: it draws nothing from the RNGs that masks and crops use."""
    _, out, _ = knn_run
    plain = tmp_path / "plain"
    assert run(tiny_args(image_dir, plain, "--epochs", "3", *NORM)) == 0
    assert train_losses(out) == train_losses(plain)


# ---------------------------------------------------------------- bad folders and settings
@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist or is not a folder"),
    ("no_val", "has no val/ folder: the kNN monitor of pre-training needs"),  # not fine-tuning's words
    ("mismatch", "the classes of train/ and val/ differ in"),
    ("one_class", "the kNN monitor needs at least 2"),
])
def test_bad_knn_folder_is_one_line_before_training(image_dir, tmp_path, capsys, case, message):
    from fcmae.pretrain import main as main_pretrain

    knn_dir = tmp_path / "knn"
    if case == "no_val":
        make_folder(knn_dir, val={}, per_class=(1, 1))
    elif case == "mismatch":
        make_folder(knn_dir, val={"blue": 0}, per_class=(1, 1))
        message += f" {knn_dir}: only in train/: green, red; only in val/: none"
    elif case == "one_class":
        make_folder(knn_dir, train={"red": 0}, val={"red": 0}, per_class=(1, 1))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main_pretrain.main(monitored(image_dir, knn_dir, out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("fcmae-pretrain: error: knn_data_path: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint-last.pth").exists()  # nothing trained


@pytest.mark.parametrize("flag, value, message", [
    ("--knn_every", "0", "knn_every must be an integer >= 1"),
    ("--knn_k", "0", "knn_k must be an integer >= 1"),
    ("--knn_temperature", "0", "knn_temperature must be a number in (0.0, inf)"),
])
def test_bad_knn_settings(image_dir, tmp_path, capsys, flag, value, message):
    expect_usage_error(tiny_args(image_dir, tmp_path / "out", "--knn_data_path", str(tmp_path), flag, value),
                       message, capsys)


# ---------------------------------------------------------------- the demo set
def test_demo_schedule_monitors_the_demo_set_only_on_demo_data(demo_cache, tmp_path, capsys):
    from fcmae.pretrain.config import resolve_config

    cfg = resolve_config(["atto", "demo", "--output_dir", str(tmp_path / "out")])
    assert (cfg.knn_data_path, cfg.knn_every) == ("demo", 1)
    monitor = KnnMonitor.from_config(cfg, DistInfo())
    # What fcmae-knn --demo reads (configs/finetune/demo.yaml): 18 photographs, 16 + 8 crops each, at 64x64.
    assert len(monitor.classes) == 18 and monitor.input_size == 64 and monitor.crop_pct == 1.0
    assert (len(monitor.train_loader.dataset), len(monitor.val_loader.dataset)) == (288, 144)
    assert Path(monitor.root).is_relative_to(demo_cache)

    with_data = resolve_config(["atto", "demo", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    capsys.readouterr()
    assert KnnMonitor.from_config(with_data, DistInfo()) is None
    assert "kNN monitor off: knn_data_path 'demo' is the demo photographs" in capsys.readouterr().out


# ---------------------------------------------------------------- evaluation: RNG, mode, two processes
def tiny_fcmae():
    from fcmae.model import build_fcmae

    return randomize_(build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=16), 3)


def monitor_of(data, rank=0, world=1):
    from fcmae.data.labelled import check_splits

    return KnnMonitor(data, check_splits(data), every=1, k=5, temperature=0.07, input_size=32, crop_pct=1.0,
                      batch_size=4, num_workers=0, device=torch.device("cpu"), rank=rank, world_size=world)


def test_evaluation_restores_train_mode_and_draws_no_random_numbers(tmp_path):
    model = tiny_fcmae().train()
    monitor = monitor_of(shuffled_folder(tmp_path / "data"))
    state = torch.get_rng_state()
    result = monitor.evaluate(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and result["count"] == 12


def _two_ranks(rank, data, init_file, results):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        results[rank] = monitor_of(data, rank, 2).evaluate(tiny_fcmae())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_single_process_monitor(tmp_path):
    import torch.multiprocessing as mp

    data = shuffled_folder(tmp_path / "data")  # 18 train, 12 val images
    single = monitor_of(data).evaluate(tiny_fcmae())
    assert 0 < single["top1"] < 100
    results = mp.Manager().dict()
    mp.start_processes(_two_ranks, args=(data, tmp_path / "init", results), nprocs=2, join=True, start_method="fork")
    assert results[0] == single and results[1] == single
