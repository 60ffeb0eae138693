"""Small data sets: the plan fits them and counts what each epoch trains on; default output folders name the data
set; a failed start leaves no folder behind; the end-of-run summary and curves.png."""

import json
import sys

import pytest
import torch

from fcmae.pretrain.config import resolve_config as pretrain_config
from fcmae.runtime.config import data_set_name
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.errors import ConfigError, PlanError
from fcmae.runtime.loader import ResumableDistributedSampler, train_loader
from fcmae.runtime.output_folder import first_missing, removed_on_failure
from fcmae.runtime.plan import epoch_images, make_plan
from fcmae.runtime.report import KNN_TOP1, VAL_TOP1, finish_run, summary_lines
from finetune.config import resolve_config as finetune_config

CPU = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")


# ---------------------------------------------------------------- the plan of a small data set
def test_a_data_set_smaller_than_one_step_lowers_the_effective_batch_and_says_so():
    cfg = pretrain_config(["atto", "800ep", "--data_path", "/d"])  # 4096 images per optimizer step
    plan = make_plan(cfg, 1, 60)
    assert (plan.batch_size, plan.update_freq, plan.effective_batch, plan.steps_per_epoch) == (60, 1, 60, 1)
    assert plan.lr == pytest.approx(cfg.blr * 60 / 256)
    assert any("effective batch lowered from 4096 to 60" in note and "only 60 images" in note for note in plan.notes)
    # as few iterations of at most batch_size 256 as hold the images, of equal size: 1,000 = 4 x 250
    plan = make_plan(cfg, 1, 1000)
    assert (plan.batch_size, plan.update_freq, plan.images_per_epoch) == (250, 4, 1000)
    plan = make_plan(cfg.replace(batch_size=64), 1, 1000)  # 16 x 62 = 992: 8 left out, not 40 (15 x 64)
    assert (plan.batch_size, plan.update_freq, plan.images_per_epoch) == (62, 16, 992)
    plan = make_plan(cfg, 2, 61)  # 30 per process
    assert (plan.batch_size, plan.update_freq, plan.effective_batch) == (30, 1, 60)
    with pytest.raises(PlanError, match="too few for 8 processes"):
        make_plan(cfg, 8, 7)


def test_an_explicit_update_freq_keeps_the_error_for_a_batch_larger_than_the_data_set():
    cfg = pretrain_config(["atto", "800ep", "--data_path", "/d", "--update_freq", "1"])
    with pytest.raises(PlanError, match="batch larger than the data set"):
        make_plan(cfg, 1, 60)


def test_the_plan_counts_the_images_each_epoch_leaves_out():
    plan = make_plan(pretrain_config(["atto", "demo", "--data_path", "/d"]), 1, 60)  # batch 32
    assert (plan.iters_per_epoch, plan.images_per_epoch) == (1, 32)
    text = epoch_images(plan, keep_hint="--drop_last false trains on them too")
    assert text.startswith("32 of 60 images in 1 batch of 32; 28 left out each epoch (the last, partial batch; "
                           "a different draw each epoch"), text
    assert text.endswith("--drop_last false trains on them too")
    plan = make_plan(pretrain_config(["atto", "small", "--data_path", "/d"]), 1, 64)
    assert epoch_images(plan) == "64 of 64 images in 4 batches of 16"


def test_keep_last_trains_on_every_image_of_each_epoch():
    cfg = finetune_config(["atto", "none", "--data_path", "/d", "--config", "small"])
    assert cfg.drop_last is False and cfg.batch_size == 16 and cfg.input_size == 96
    plan = make_plan(cfg, 1, 60, keep_last=True)
    assert (plan.iters_per_epoch, plan.steps_per_epoch, plan.images_per_epoch) == (4, 4, 60)
    assert epoch_images(plan) == "60 of 60 images in 4 batches of 16, the last of 12"
    # Mixup/CutMix: an odd share leaves out one image, so that the last batch is even
    plan = make_plan(cfg, 1, 61, keep_last=True, even_batches=True)
    assert (plan.iters_per_epoch, plan.images_per_epoch) == (4, 60)
    assert "1 left out each epoch (so that the last batch is even" in epoch_images(plan)
    # two processes: the shares are made equal by repeating an image
    plan = make_plan(cfg, 2, 61, keep_last=True)
    assert (plan.batch_size, plan.iters_per_epoch, plan.images_per_epoch) == (8, 4, 62)  # 31 a share
    assert "1 image(s) twice, so that each of 2 processes gets as many" in epoch_images(plan)
    # gradient accumulation takes whole batches: the plan says so and drops the last one
    plan = make_plan(cfg.replace(update_freq=2), 1, 60, keep_last=True)
    assert not plan.keep_last and (plan.iters_per_epoch, plan.images_per_epoch) == (2, 32)
    assert any("drop_last false has no effect with gradient accumulation" in note for note in plan.notes)


def test_the_loader_trains_on_the_last_partial_batch_when_the_plan_keeps_it():
    cfg = finetune_config(["atto", "none", "--data_path", "/d", "--config", "small"])
    kept = train_loader(list(range(60)), make_plan(cfg, 1, 60, keep_last=True), 0, 0, CPU)
    assert [len(batch) for batch in kept] == [16, 16, 16, 12]
    assert sorted(torch.cat(list(kept)).tolist()) == list(range(60))
    dropped = train_loader(list(range(60)), make_plan(cfg, 1, 60), 0, 0, CPU)
    assert [len(batch) for batch in dropped] == [16, 16, 16]
    even = train_loader(list(range(61)), make_plan(cfg, 1, 61, keep_last=True, even_batches=True), 0, 0, CPU)
    assert [len(batch) for batch in even] == [16, 16, 16, 12]


def test_the_sampler_resumes_inside_an_epoch_that_keeps_its_last_batch():
    samplers = [ResumableDistributedSampler(list(range(11)), 4, num_replicas=2, rank=r, seed=1, keep_last=True)
                for r in range(2)]
    for sampler in samplers:
        sampler.set_epoch(2)
    full = [list(sampler) for sampler in samplers]
    assert [len(f) for f in full] == [6, 6] and set(full[0]) | set(full[1]) == set(range(11))
    assert [sampler.batches_per_epoch() for sampler in samplers] == [2, 2]  # 4 + 2: the ranks stay in step
    samplers[0].set_epoch(2, start_batch=1)
    assert list(samplers[0]) == full[0][4:] and len(samplers[0]) == 2


# ---------------------------------------------------------------- output folders
def test_default_output_folders_name_the_data_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "my photos"
    assert data_set_name(photos) == "my_photos" and data_set_name(photos / "train") == "my_photos"
    assert pretrain_config(["atto", "small", "--data_path", str(photos)]).output_dir == \
        "output/pretrain/atto_small_my_photos"
    assert pretrain_config(["atto", "demo"]).output_dir == "output/pretrain/atto_demo"
    assert pretrain_config(["atto", "demo", "--data_path", "photos/train"]).output_dir == \
        "output/pretrain/atto_demo_photos"


def test_shard_specs_are_named_by_the_folder_holding_the_shards():
    assert data_set_name("/data/in22k/train-{000000..000099}.tar") == "in22k"
    assert data_set_name("/data/in22k/train/part-{0..9}.tar") == "in22k"
    assert data_set_name("pipe:aws s3 cp s3://bucket/imagenet/train-{0000..0099}.tar -") == "imagenet"
    assert pretrain_config(["atto", "demo", "--data_path", "/data/shards/train-{000000..000003}.tar"]).output_dir \
        == "output/pretrain/atto_demo_shards"
    assert finetune_config(["atto", "none", "--data_path", "photos"]).output_dir == "output/finetune/atto_photos"
    assert finetune_config(["atto", "none", "--demo"]).output_dir == "output/finetune/atto_demo"
    assert pretrain_config(["atto", "small", "--data_path", "photos", "--output_dir", "x"]).output_dir == "x"


def test_a_run_begun_before_the_data_set_was_named_keeps_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "output" / "pretrain" / "atto_800ep"
    old.mkdir(parents=True)
    (old / "config.yaml").write_text(f"data_path: {tmp_path / 'imagenet'}\n")
    assert pretrain_config(["atto", "800ep", "--data_path", "imagenet"]).output_dir == "output/pretrain/atto_800ep"
    assert pretrain_config(["atto", "800ep", "--data_path", "other"]).output_dir == \
        "output/pretrain/atto_800ep_other"


def test_a_finetune_config_is_found_by_its_name():
    assert finetune_config(["atto", "none", "--data_path", "/d", "--config", "small"]).recipe_source == "derived"
    with pytest.raises(ConfigError, match="config file not found: smal .*demo, small"):
        finetune_config(["atto", "none", "--data_path", "/d", "--config", "smal"])


def test_a_failed_start_removes_only_the_folders_it_made_with_nothing_to_keep(tmp_path):
    def fail_in(folder, *files):
        created = first_missing(folder)
        with pytest.raises(RuntimeError), removed_on_failure(created):
            folder.mkdir(parents=True, exist_ok=True)
            for name in files:
                (folder / name).write_text("x")
            raise RuntimeError("bad input")

    fail_in(tmp_path / "new" / "out", "config.yaml")
    assert not (tmp_path / "new").exists()
    fail_in(tmp_path / "kept" / "out", "config.yaml", "checkpoint-last.pth")
    assert (tmp_path / "kept" / "out" / "checkpoint-last.pth").is_file()
    fail_in(tmp_path / "locked", ".fcmae.lock")  # another run's lock: its folder
    assert (tmp_path / "locked" / ".fcmae.lock").is_file()
    (tmp_path / "existing").mkdir()
    fail_in(tmp_path / "existing")
    assert (tmp_path / "existing").is_dir()


# ---------------------------------------------------------------- the end of a run
def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


PRETRAIN_LOG = [
    {"type": "train", "epoch": 0, "iteration": 3, "step": 3, "loss": 1.0, "lr": 1e-4},
    {"type": "epoch", "epoch": 1, "loss": 1.0, "step": 3, "seconds": 2.0, "images_per_s": 24.0},
    {"type": "knn", "epoch": 1, "top1": 20.0},
    {"type": "train", "epoch": 1, "iteration": 3, "step": 6, "loss": 0.5, "lr": 5e-5},
    {"type": "epoch", "epoch": 2, "loss": 0.5, "step": 6, "seconds": 4.0, "images_per_s": 12.0},
    {"type": "knn", "epoch": 2, "top1": 35.5},
]


def test_the_summary_gives_epochs_time_loss_and_accuracy():
    text = "\n".join(summary_lines(PRETRAIN_LOG, "loss", KNN_TOP1))
    assert "epochs           2 (6 optimizer steps)" in text
    assert "time             3.0 s per epoch, 16.0 images/s (0:06 of training)" in text
    assert "loss             1.0000 after epoch 1 -> 0.5000 after epoch 2" in text
    assert "kNN top-1        20.00% after epoch 1 -> 35.50% after epoch 2 (best 35.50%, epoch 2)" in text
    finetune = [{"type": "epoch", "epoch": e, "train_loss": 1.0 / e, "acc1": a} for e, a in ((1, 40.0), (2, 30.0))]
    assert "  val top-1        40.00% after epoch 1 -> 30.00% after epoch 2 (best 40.00%, epoch 1)" in \
        summary_lines(finetune, "train_loss", VAL_TOP1)


def test_curves_are_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    write_log(tmp_path / "log.jsonl", PRETRAIN_LOG)
    lines = finish_run(tmp_path)
    assert lines[-1].strip().startswith(f"curves           {tmp_path / 'curves.png'}")
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.width > 600 and picture.height > 200


def test_without_matplotlib_one_line_says_how_to_get_the_curves(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure raises ImportError
    write_log(tmp_path / "log.jsonl", PRETRAIN_LOG)
    lines = finish_run(tmp_path)
    assert "pip install matplotlib" in lines[-1] and f"python -m fcmae.runtime.report {tmp_path}" in lines[-1]
    assert not (tmp_path / "curves.png").exists()
    assert any("kNN top-1" in line for line in lines)
