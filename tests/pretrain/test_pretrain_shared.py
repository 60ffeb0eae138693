"""The shared helpers: configs, checkpoints, lr schedule, sampler, demo data, progress lines."""

import io
import os
from pathlib import Path

import pytest
import torch
import yaml

from fcmae.data.demo import demo_classification_folder, demo_pretrain_folder
from fcmae.data.folder import ImageFolderDataset, list_images
from fcmae.pretrain.main import format_plan, resolve_config
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.config import (
    apply_overrides,
    dump_config,
    load_config,
    merge_configs,
    parse_overrides,
    split_positionals,
)
from fcmae.runtime.errors import CheckpointError, ConfigError
from fcmae.runtime.loader import ResumableDistributedSampler
from fcmae.runtime.logs import JsonlLogger, ProgressMeter, read_jsonl
from fcmae.runtime.plan import cosine_lr, make_plan, set_lr

REPO = Path(__file__).resolve().parents[2]
SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


# ---------------------------------------------------------------- config
def test_merge_parse_override_and_dump(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("x: 1\nopt: {lr: 0.1, betas: [0.9, 0.95]}\nname: a\n")
    b = tmp_path / "b.yaml"
    b.write_text("opt: {lr: 0.2}\n")
    cfg = load_config([a, b], defaults={"x": 0, "extra": True})
    assert cfg == {"x": 1, "extra": True, "opt": {"lr": 0.2, "betas": [0.9, 0.95]}, "name": "a"}
    over = parse_overrides(["--x", "3", "--opt.lr=1e-4", "name=b", "--flag", "--alias", "7"],
                           aliases={"alias": "x"}, flags=["flag"])
    assert over == {"x": 7, "opt.lr": 1e-4, "name": "b", "flag": True}
    cfg = apply_overrides(cfg, {"opt.lr": 1e-4, "name": None})
    assert cfg["opt"]["lr"] == 1e-4 and cfg["name"] is None
    with pytest.raises(ConfigError, match="unknown config key 'opt.nope'"):
        apply_overrides(cfg, {"opt.nope": 1})
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--x"])
    text = dump_config(cfg, tmp_path / "out" / "cfg.yaml")
    assert yaml.safe_load(text) == yaml.safe_load((tmp_path / "out" / "cfg.yaml").read_text()) == cfg
    assert merge_configs({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    assert split_positionals(["atto", "demo", "--x", "1"], 2) == (["atto", "demo"], ["--x", "1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("a: [1, 2\n")
        load_config([bad])


def test_an_unknown_key_names_the_closest_known_one(tmp_path, capsys):
    """A typo gets one suggestion instead of the list of every key; a name like none still gets the list."""
    from fcmae.pretrain import main as main_pretrain

    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(["atto", "demo", "--epcohs", "3", "--dry_run"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip() == "fcmae-pretrain: error: unknown config key 'epcohs'; did you mean --epochs?"
    with pytest.raises(ConfigError, match="'zzqx'; known keys: .*epochs"):
        apply_overrides({"epochs": 1, "seed": 0}, {"zzqx": 1})
    typo = tmp_path / "typo.yaml"  # a config file's key: suggested as the file spells it
    typo.write_text("warmup_epoch: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'warmup_epoch'; did you mean 'warmup_epochs'\\?"):
        resolve_config(["atto", "demo", "--config", str(typo)])


def test_every_size_and_schedule_resolves():
    for size in SIZES:
        for schedule in ("800ep", "1600ep"):
            cfg = resolve_config([size, schedule, "--data_path", "/data"])
            assert cfg.size == size and cfg.epochs == int(schedule[:-2])
            assert cfg.effective_batch == 4096 and cfg.blr == 1.5e-4 and cfg.warmup_epochs == 40
            assert cfg.betas == (0.9, 0.95) and cfg.mask_ratio == 0.6 and cfg.input_size == 224
            assert make_plan(cfg, 64).effective_batch == 4096
    demo = resolve_config(["atto", "demo"])
    assert demo.demo_data and demo.output_dir == os.path.join("output", "pretrain", "atto_demo")


def test_reference_flags_and_plan():
    cfg = resolve_config(["--model", "convnextv2_base", "--data_path", "/d", "--output_dir", "/o", "--batch_size",
                          "64", "--update_freq", "8", "--blr", "1.5e-4", "--epochs", "1600", "--warmup_epochs", "40",
                          "--input_size", "224", "--mask_ratio", "0.6", "--resume", "/o/x.pth", "--seed", "3",
                          "--device", "cpu", "--pin_mem"])
    assert (cfg.size, cfg.epochs, cfg.update_freq, cfg.seed, cfg.resume) == ("base", 1600, 8, 3, "/o/x.pth")
    plan = make_plan(cfg, 8)
    assert plan.effective_batch == 4096 and plan.lr == pytest.approx(2.4e-3)
    auto = resolve_config(["huge", "800ep", "--data_path", "/d"])
    for world, accum in ((1, 128), (8, 16), (128, 1)):
        assert make_plan(auto, world).update_freq == accum
    plan = make_plan(auto, 8, num_images=1_281_167)
    assert plan.steps_per_epoch == 1_281_167 // 8 // 32 // 16
    assert plan.total_steps == 800 * plan.steps_per_epoch
    text = format_plan(auto, plan, "/d")
    for part in ("convnextv2_huge (depths [3, 3, 27, 3], dims [352, 704, 1408, 2816])", "224x224, mask ratio 0.6",
                 "(19 of 49 patches visible)", "accumulation     16", "effective batch  4096 (= 32 x 8 x 16",
                 f"{plan.steps_per_epoch} optimizer steps/epoch", "(1281167 images)"):
        assert part in text, text


def test_reference_flags_that_take_values_are_accepted():
    # The reference release's main_pretrain.py declares these with values (str2bool / int / str).
    cfg = resolve_config(["--model", "convnextv2_atto", "--data_path", "/d", "--pin_mem", "True",
                          "--auto_resume", "true", "--dist_url", "env://", "--local_rank", "0", "--start_epoch", "0",
                          "--dist_on_itp", "False", "--norm_pix_loss", "--local-rank=1", "--epochs", "50"])
    assert (cfg.size, cfg.data_path, cfg.epochs, cfg.norm_pix_loss) == ("atto", "/d", 50, True)
    assert not any(k in cfg.to_dict() for k in ("pin_mem", "auto_resume", "dist_url", "local_rank", "start_epoch"))
    assert resolve_config(["atto", "800ep", "--data_path", "/d", "--dry_run", "false"]).dry_run is False


# ---------------------------------------------------------------- checkpoints
def test_atomic_save_never_destroys_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ckpt.save_atomic({"step": 1}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]  # no temporary file left


def test_keep_newest_and_find_latest(tmp_path):
    assert ckpt.find_latest_checkpoint(tmp_path) is None
    for epoch in range(1, 6):
        ckpt.save_checkpoint({"epoch": epoch}, tmp_path, epoch_done=epoch, save_every=2, keep=2)
    assert [p.name for p in ckpt.numbered_checkpoints(tmp_path)] == ["checkpoint-0002.pth", "checkpoint-0004.pth"]
    assert ckpt.find_latest_checkpoint(tmp_path).name == "checkpoint-last.pth"
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch"] == 5
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-0004.pth")["epoch"] == 4  # not changed by later saves
    (tmp_path / "checkpoint-last.pth").unlink()
    assert ckpt.find_latest_checkpoint(tmp_path).name == "checkpoint-0004.pth"


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    # Checkpoints of higher epochs left from an earlier run (a rollback with --resume PATH, or --resume none):
    # the epoch checkpoint this run just wrote must survive pruning.
    for epoch in (8, 10):
        ckpt.save_atomic({"epoch": epoch, "old": True}, tmp_path / f"checkpoint-{epoch:04d}.pth")
    written = ckpt.save_checkpoint({"epoch": 4}, tmp_path, epoch_done=4, save_every=2, keep=1)
    assert written[-1].name == "checkpoint-0004.pth" and written[-1].is_file()
    assert [p.name for p in ckpt.numbered_checkpoints(tmp_path)] == ["checkpoint-0004.pth"]
    assert ckpt.load_checkpoint(written[-1])["epoch"] == 4
    ckpt.save_atomic({"epoch": 10, "old": True}, tmp_path / "checkpoint-0010.pth")
    ckpt.save_checkpoint({"epoch": 6}, tmp_path, epoch_done=6, save_every=2, keep=2)
    assert [p.name for p in ckpt.numbered_checkpoints(tmp_path)] == ["checkpoint-0006.pth", "checkpoint-0010.pth"]
    assert (tmp_path / "checkpoint-last.pth").is_file()


def test_broken_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        ckpt.load_checkpoint(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "list.pth")


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------- schedule, sampler, logs
def test_warmup_then_cosine():
    lrs = [cosine_lr(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.001
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr_scale": 0.5}], lr=1)
    set_lr(opt, 0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_sampler_resumes_mid_epoch():
    data = list(range(50))
    samplers = [ResumableDistributedSampler(data, 4, num_replicas=2, rank=r, seed=1) for r in range(2)]
    for s in samplers:
        s.set_epoch(3)
    full = [list(s) for s in samplers]
    assert len(full[0]) == 24 and not set(full[0]) & set(full[1])  # 6 batches of 4 per rank, disjoint
    samplers[0].set_epoch(3, start_batch=2)
    assert list(samplers[0]) == full[0][8:] and len(samplers[0]) == 16
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != full[0]


def test_loader_workers_are_capped_at_the_cpus_with_a_note(tmp_path, capsys):
    """More workers than CPUs draw torch's warning in every run: the training and kNN loaders use at most the
    CPUs this process may run on, and say so once."""
    import warnings

    from fcmae.data.labelled import check_splits
    from fcmae.eval.knn import make_loaders
    from fcmae.runtime.distributed import DistInfo
    from fcmae.runtime.loader import available_cpus, train_loader
    from tests.helpers import write_images

    cpus, asked = available_cpus(), available_cpus() + 3
    plan = make_plan(resolve_config(["atto", "demo", "--batch_size", "4", "--effective_batch", "4"]), 1, 24)
    loader = train_loader(list(range(24)), plan, asked, 0, DistInfo())
    write_images(tmp_path / "train" / "a", 2, size=40)
    write_images(tmp_path / "val" / "a", 2, size=40)
    loaders = make_loaders(tmp_path, check_splits(tmp_path), 32, 1.0, 2, asked)
    for built in (loader, *loaders):
        assert built.num_workers == cpus
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's "will create N worker processes" would raise here
            built.check_worker_number_rationality()
    out = capsys.readouterr().out
    assert out.count(f"note: num_workers {asked} is more than the {cpus} CPU(s) this process may use") == 1, out
    assert train_loader(list(range(24)), plan, cpus, 0, DistInfo()).num_workers == cpus  # a fitting count stays


def test_progress_line_and_jsonl(tmp_path):
    stream = io.StringIO()
    meter = ProgressMeter(total_steps=100, images_per_step=32, stream=stream)
    meter.line(0, 10, 5, 10, 5, {"loss": 0.5, "lr": 1e-3})
    line = stream.getvalue()
    for part in ("epoch 1/10", "step 5/10", "loss 0.5", "lr 0.001", "img/s", "run ETA "):  # the run's, not the epoch's
        assert part in line, line
    log = JsonlLogger(tmp_path / "log.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.truncate_after("step", 3)
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 3]


# ---------------------------------------------------------------- demo data
def test_demo_folders_are_built_once(tmp_path):
    root = demo_pretrain_folder(tmp_path, crop_size=64, per_photo=2)
    files = list_images(root / "train")
    assert len(files) >= 30 and not (root / "val").exists()
    stamp = files[0].stat().st_mtime_ns
    assert demo_pretrain_folder(tmp_path, crop_size=64, per_photo=2) == root
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left

    labelled = demo_classification_folder(tmp_path, crop_size=64, train_per_photo=3, val_per_photo=1)
    classes = sorted(p.name for p in (labelled / "train").iterdir())
    assert classes == sorted(p.name for p in (labelled / "val").iterdir())
    assert len(classes) >= 15 and "astronaut" in classes and "coffee" in classes
    assert all(len(list((labelled / "train" / c).iterdir())) == 3 for c in classes)
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(labelled / "val")
    assert len(ds) == len(classes) and ds[0][0].size == (64, 64)

    images = ImageFolderDataset(root / "train")
    assert len(images) == len(files)
