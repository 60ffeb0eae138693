"""Fine-tuning: recipes and flags, layer decay, loading pre-trained weights, evaluation, bad input."""

import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fcmae import build_fcmae
from fcmae.runtime.config import load_yaml
from fcmae.weights.layouts import ConversionError
from finetune import main_finetune as ft
from finetune.config import finetune_config_dir
from finetune.engine import evaluate
from finetune.model import build_model, load_pretrained
from finetune.optim import head_layer_id, layer_id, param_groups
from sparse.sizes import MODEL_SIZES
from tests.helpers import TINY_ARGS as TINY

# ---------------------------------------------------------------- recipes and flags
PUBLISHED = {  # docs/PUBLISHED_SETTINGS.md: blr, epochs, warmup, layer decay, wd, drop path, mixup, cutmix, smoothing
    "atto": (2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.0, 0.0, 0.2),
    "tiny": (8e-4, 300, 40, "single", 0.9, 0.05, 0.2, 0.8, 1.0, 0.1),
    "base": (6.25e-4, 100, 20, "group", 0.6, 0.05, 0.1, 0.8, 1.0, 0.1),
}


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_every_size_has_a_recipe_marked_published_or_derived(size):
    cfg = ft.resolve_config([size, "none", "--data_path", "/nonexistent", "--dry_run"])
    raw = load_yaml(finetune_config_dir() / "sizes" / f"{size}.yaml")
    assert raw["recipe_source"] == ("published" if size in PUBLISHED else "derived")
    assert cfg.size == size and cfg.effective_batch == 1024 and cfg.head_init_scale == 0.001
    assert cfg.aa == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25 and cfg.min_lr == 1e-6
    assert cfg.model_ema and cfg.model_ema_decay == 0.9999
    if size in PUBLISHED:
        keys = ("blr", "epochs", "warmup_epochs", "layer_decay_type", "layer_decay", "weight_decay", "drop_path",
                "mixup", "cutmix", "smoothing")
        assert tuple(getattr(cfg, k) for k in keys) == PUBLISHED[size]


def test_reference_flag_names_are_accepted(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save({}, ckpt)
    cfg = ft.resolve_config([
        "--model", "convnextv2_tiny", "--finetune", str(ckpt), "--data_path", str(tmp_path), "--nb_classes", "10",
        "--layer_decay", "0.8", "--layer_decay_type", "group", "--model_ema", "true", "--model_ema_eval", "false",
        "--mixup", "0.1", "--cutmix", "0", "--smoothing", "0.2", "--reprob", "0.1", "--drop_path", "0.3",
        "--update_freq", "2", "--blr", "1e-3", "--use_amp", "true", "--dist_eval", "true", "--data_set", "IMNET",
        "--save_ckpt_freq", "5", "--dry_run"])
    assert cfg.size == "tiny" and cfg.finetune == str(ckpt) and cfg.num_classes == 10
    assert (cfg.layer_decay, cfg.layer_decay_type, cfg.model_ema, cfg.model_ema_eval) == (0.8, "group",
                                                                                                       True, False)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob, cfg.drop_path) == (0.1, 0, 0.2, 0.1, 0.3)
    assert (cfg.update_freq, cfg.blr, cfg.save_every) == (2, 1e-3, 5)


def test_dry_run_prints_the_plan(tmp_path, capsys):
    for split, count in (("train", 1100), ("val", 3)):  # counted, not read: more than one optimizer step
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(count):
            (tmp_path / split / "a" / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        ft.main(["base", "none", "--data_path", str(tmp_path), "--world_size", "16", "--dry_run"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "accumulation     1" in out and "effective batch  1024" in out and "group" in out
    assert "lr               0.0025" in out  # 6.25e-4 * 1024 / 256


@pytest.mark.slow
def test_launcher_takes_paths_relative_to_the_callers_directory(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "w.pth").write_bytes(b"")  # only its existence is checked by a dry run
    script = Path(__file__).resolve().parents[2] / "launch" / "finetune.sh"
    result = subprocess.run(["bash", str(script), "atto", "w.pth", "--demo", "--dry_run"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": sys.executable, "FCMAE_LAUNCHER": "python"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pre-trained      w.pth" in result.stdout and "output/finetune/atto_demo" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["atto"], "checkpoint|no data"),
    (["atto", "missing.pth", "--demo"], "checkpoint not found"),
    (["atto", "none", "--demo", "--unknown_key", "1"], "unknown config key 'unknown_key'"),
    (["atto", "none", "--demo", "--layer_decay_type", "stagewise"], "layer_decay_type"),
    (["atto", "none", "--demo", "--mixup", "0.8", "--batch_size", "7", "--effective_batch", "7"],
     "even per-GPU batch, got 7"),
    (["giant", "none", "--demo"], "unknown ConvNeXt V2 size"),
])
def test_bad_settings_are_refused_before_anything_runs(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        ft.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_eval_checks_its_output_folder_before_it_evaluates(tmp_path, capsys):
    # eval.jsonl is written after the whole validation set: an unusable folder is an error at the start.
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        ft.main(["atto", "none", "--demo", "--eval", "true", "--output_dir", str(tmp_path / "a_file" / "eval")])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "not writable" in err and "needs a checkpoint" not in err, err


def test_mixup_takes_an_odd_batch_size_that_the_plan_makes_even(capsys):
    # Only the fitted per-GPU batch must be even: 7 is lowered to 4 (4 x 2 accumulation = 8).
    with pytest.raises(SystemExit) as e:
        ft.main(["atto", "none", "--demo", "--mixup", "0.8", "--batch_size", "7", "--effective_batch", "8",
                 "--dry_run"])
    assert e.value.code == 0
    assert re.search(r"per-GPU batch +4\n", capsys.readouterr().out)


# ---------------------------------------------------------------- layer decay
def named_groups(model, **kw):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in param_groups(model, **kw) for p in g["params"]}


@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_single_layer_decay_equals_timms_helper_but_for_the_stem(size):
    # timm gives the stem its own layer; the reference release (get_num_layer_for_convnext_single) gives it
    # the first block's id.
    from timm.optim import param_groups_layer_decay

    with torch.device("meta"):
        model = timm.create_model(f"convnextv2_{size}")
    mine = named_groups(model, weight_decay=0.05, layer_decay=0.9, depths=MODEL_SIZES[size][0], rule="single")
    names = {id(p): n for n, p in model.named_parameters()}
    theirs = {names[id(p)]: (g["lr_scale"], g["weight_decay"])
              for g in param_groups_layer_decay(model, 0.05, layer_decay=0.9) for p in g["params"]}
    assert mine.keys() == theirs.keys()
    first_block = theirs["stages.0.blocks.0.conv_dw.weight"][0]
    for name in mine:
        expected = first_block if name.startswith("stem.") else theirs[name][0]
        assert mine[name][0] == pytest.approx(expected) and mine[name][1] == theirs[name][1], name


def test_layer_ids_follow_the_recipes():
    d = (3, 3, 27, 3)
    single = {"stem.0.weight": 1, "stem.1.bias": 1, "stages.0.blocks.0.conv_dw.weight": 1,
              "stages.1.downsample.1.weight": 4,
              "stages.1.blocks.0.norm.weight": 4, "stages.1.blocks.2.mlp.fc1.weight": 6,
              "stages.3.blocks.2.mlp.fc2.bias": 36, "head.fc.weight": 37, "head.norm.weight": 37}
    group = {"stem.1.bias": 0, "stages.0.blocks.2.conv_dw.weight": 1, "stages.1.downsample.0.weight": 2,
             "stages.1.blocks.2.conv_dw.weight": 2, "stages.2.downsample.1.weight": 3,
             "stages.2.blocks.2.norm.bias": 3, "stages.2.blocks.3.norm.bias": 4,
             "stages.2.blocks.26.mlp.fc1.weight": 11,
             "stages.3.downsample.1.weight": 12, "stages.3.blocks.2.mlp.fc2.weight": 12, "head.fc.bias": 13}
    assert {k: layer_id(k, d, "single") for k in single} == single
    assert {k: layer_id(k, d, "group") for k in group} == group
    assert head_layer_id(d, "group") == 13 and head_layer_id(d, "single") == 37


def test_no_weight_decay_on_biases_norms_and_grn():
    model = build_model("atto", 4, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    groups = named_groups(model, weight_decay=0.05, layer_decay=0.5, depths=(1, 1, 1, 1), rule="single")
    for name, (scale, wd) in groups.items():
        decays = name.endswith("weight") and ("conv" in name or "fc" in name or "downsample.1" in name
                                              or name == "stem.0.weight")
        assert (wd == 0.05) == decays, name
    assert groups["head.fc.weight"][0] == 1.0 and groups["stem.0.weight"][0] == 0.5 ** 4


# ---------------------------------------------------------------- loading pre-trained weights
def test_fcmae_checkpoint_loads_on_the_fly_and_reports_keys():
    fcmae = build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=16)
    model = build_model("atto", 3, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), head_init_scale=0.001)
    report = load_pretrained(model, {"model": fcmae.state_dict(), "epoch": 1}, "fcmae.pth")
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    assert report.unexpected == [] and len(report.loaded) == len(fcmae.encoder.state_dict())
    assert {k.split(".")[0] for k in report.dropped} == {"proj", "mask_token", "decoder", "pred"}
    assert torch.equal(model.stages[1].blocks[0].mlp.fc1.weight.flatten(1),
                       fcmae.encoder.stages[1].blocks[0].mlp.fc1.weight)
    text = "\n".join(report.lines())
    assert "missing     4 (newly initialised)" in text and "used only in pre-training" in text
    assert float(model.head.fc.weight.detach().abs().max()) < 1e-3  # head init scale


def test_size_mismatch_between_checkpoint_and_model_is_named():
    fcmae = build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=16)
    model = build_model("atto", 3, depths=(1, 1, 1, 1), dims=(8, 16, 16, 24))
    with pytest.raises(ConversionError,
                       match=r"size mismatch: x.pth holds a custom ConvNeXt V2 .*dims \[8, 16, 16, 16\]"):
        load_pretrained(model, fcmae.state_dict(), "x.pth")


def test_evaluate_counts_top1_and_top5_exactly():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0, 9, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0, 9]])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[x.long().flatten()]

    loader = [(torch.tensor([[0], [1]]), torch.tensor([0, 5])), (torch.tensor([[2]]), torch.tensor([2]))]
    r = evaluate(Fixed(), loader, torch.device("cpu"))
    # image 0: top-1 hit; image 1 (label 5, 2nd best): top-5 hit only; image 2 (label 2, 3rd best): top-5 hit
    assert r["count"] == 3 and r["acc1"] == pytest.approx(100 / 3) and r["acc5"] == pytest.approx(100.0)
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 5, 2]))))

    class FourClasses(torch.nn.Module):  # 5 classes or fewer: top-5 is every class, so it is not reported
        def forward(self, x):
            return logits[x.long().flatten(), :4]

    r = evaluate(FourClasses(), [(torch.tensor([[0], [1], [2]]), torch.tensor([0, 3, 2]))], torch.device("cpu"))
    assert r["count"] == 3 and r["acc1"] == pytest.approx(100 / 3) and "acc5" not in r


# ---------------------------------------------------------------- bad data and checkpoints
def make_folder(root, train_classes=("a", "b", "c"), val_classes=("a", "b", "c"), per_class=2):
    rng = np.random.RandomState(0)
    for split, classes in (("train", train_classes), ("val", val_classes)):
        if classes is None:
            continue
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.randint(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("case, message", [
    ("no_val", "has no val/ folder"),
    ("classes_differ", "only in train/: c; only in val/: d"),
    ("num_classes", "num_classes is 5 but the data set"),
    ("truncated", "truncated or not a PyTorch checkpoint"),
    ("not_checkpoint", "unrecognised weights"),
    ("size", "size mismatch"),
])
def test_bad_input_is_a_clear_error_before_training(tmp_path, capsys, case, message):
    data = make_folder(tmp_path / "data", val_classes=None if case == "no_val" else
                       ("a", "b", "d") if case == "classes_differ" else ("a", "b", "c"))
    weights = tmp_path / "w.pth"
    fcmae = build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=16)
    torch.save({"model": fcmae.state_dict()}, weights)
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    if case == "not_checkpoint":
        torch.save({"model": {"fc.weight": torch.zeros(3)}}, weights)
    argv = ["atto", str(weights), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
            "--num_workers", "0", "--device", "cpu", "--batch_size", "2"] + ([] if case == "size" else TINY)
    if case == "num_classes":
        argv += ["--num_classes", "5"]
    with pytest.raises(SystemExit) as e:
        ft.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


# ---------------------------------------------------------------- unreadable images
def truncate_copy(source, target):
    """`target`: the first third of `source`'s bytes (a truncated image file)."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 3])


def tiny_finetune(data, out, *extra):
    """A one-epoch fine-tuning of the tiny model on `data` into `out` (32-pixel crops, batches of 2)."""
    return ["atto", "none", "--data_path", str(data), "--output_dir", str(out), *TINY, "--device", "cpu",
            "--num_workers", "0", "--input_size", "32", "--batch_size", "2", "--effective_batch", "2", "--epochs",
            "1", "--warmup_epochs", "0", "--model_ema", "false", "--print_every", "1", *extra]


def run_finetune(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ft.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_with_5_classes_or_fewer_no_line_or_record_speaks_of_top5(tmp_path, capsys):
    """3 classes: every image's class is among the best 5, so top-5 is left out of the epoch and final lines,
    the "epoch" records, and --eval's line and eval.jsonl record."""
    data, out = make_folder(tmp_path / "data", per_class=2), tmp_path / "out"
    code, text, err = run_finetune(tiny_finetune(data, out), capsys)
    assert code == 0, err
    assert "val top-1" in text and "final top-1" in text and "top-5" not in text, text
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("type") == "epoch"]
    assert len(epochs) == 1 and "acc1" in epochs[0] and "acc5" not in epochs[0]
    code, text, err = run_finetune(tiny_finetune(data, out, "--eval", "true"), capsys)
    assert code == 0, err
    assert "eval model: top-1" in text and "top-5" not in text, text
    result = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert "model_acc1" in result and "model_acc5" not in result


def test_unreadable_training_image_is_skipped_and_logged_once_then_too_many_stop(tmp_path, capsys):
    """An unreadable training image crashed fine-tuning mid-epoch; now it is skipped as in pre-training."""
    data = make_folder(tmp_path / "data", per_class=3)
    Image.open(data / "train" / "b" / "0.png").save(tmp_path / "whole.jpg")
    truncate_copy(tmp_path / "whole.jpg", data / "train" / "b" / "1b_truncated.jpg")
    # 10 training images, 1 bad, at most 10% (1) allowed: skipped, logged once, the epoch trains all its steps.
    code, out, err = run_finetune(tiny_finetune(data, tmp_path / "o1", "--max_bad_fraction", "0.1"), capsys)
    assert code == 0, err
    assert out.count("skipping unreadable image") == 1 and "1b_truncated.jpg (OSError" in out
    epochs = [r for r in map(json.loads, (tmp_path / "o1" / "log.jsonl").read_text().splitlines())
              if r.get("type") == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 5)]  # 10 images in batches of 2
    # None allowed: one line naming the file and the setting, exit 2, no checkpoint.
    code, out, err = run_finetune(tiny_finetune(data, tmp_path / "o2", "--max_bad_fraction", "0"), capsys)
    assert code == 2 and err.startswith("fcmae-finetune: error: 1 of 10 images are unreadable"), err
    assert "max_bad_fraction" in err and "1b_truncated.jpg" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o2" / "checkpoint-last.pth").exists()


def test_unreadable_validation_image_is_a_one_line_error_naming_it(tmp_path, capsys):
    """Validation never replaces an image (that would bias the accuracy): an unreadable one is one line naming it,
    at the end of a training epoch and with --eval, not a traceback."""
    data = make_folder(tmp_path / "data")
    bad = data / "val" / "c" / "2_truncated.png"
    truncate_copy(data / "val" / "c" / "0.png", bad)
    code, out, err = run_finetune(tiny_finetune(data, tmp_path / "o1"), capsys)
    assert code == 2 and err.startswith(f"fcmae-finetune: error: unreadable image {bad} ("), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # --eval of a checkpoint (saved when the run stopped after its first step).
    assert run_finetune(tiny_finetune(data, tmp_path / "o2", "--exit_after_steps", "1"), capsys)[0] == 0
    code, out, err = run_finetune(tiny_finetune(data, tmp_path / "o2", "--eval", "true"), capsys)
    assert code == 2 and err.startswith(f"fcmae-finetune: error: unreadable image {bad} ("), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_a_failed_evaluation_keeps_the_epochs_training_and_the_run_resumes_exactly(tmp_path, capsys):
    """An unreadable validation image stops the run after the epoch's training: that training is saved (as a
    stop in the epoch's last iteration would be), and once the image is fixed the same command evaluates the
    epoch and goes on to the same weights as a run that never failed."""
    data = make_folder(tmp_path / "data")
    bad = data / "val" / "c" / "2_truncated.png"
    truncate_copy(data / "val" / "c" / "0.png", bad)
    two_epochs = ("--epochs", "2", "--save_ckpt_freq", "1")
    code, out, err = run_finetune(tiny_finetune(data, tmp_path / "o1", *two_epochs), capsys)
    assert code == 2 and "unreadable image" in err and "epoch 1's training is saved" in out
    saved = torch.load(tmp_path / "o1" / "checkpoint-last.pth", weights_only=True)
    assert saved["run_state"]["epoch"] == 0 and saved["step"] == 3  # 6 images in batches of 2, not evaluated
    bad.write_bytes((data / "val" / "c" / "0.png").read_bytes())
    assert run_finetune(tiny_finetune(data, tmp_path / "o1", *two_epochs), capsys)[0] == 0
    assert run_finetune(tiny_finetune(data, tmp_path / "o2", *two_epochs), capsys)[0] == 0
    resumed, clean = (torch.load(tmp_path / o / "checkpoint-last.pth", weights_only=True) for o in ("o1", "o2"))
    assert resumed["step"] == clean["step"] == 6
    for key, value in clean["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_randaugment_posterize_at_top_magnitude_works_with_this_pillow():
    from timm.data.auto_augment import AugmentOp

    from finetune import data as ftdata

    ftdata.train_transform({"input_size": 32, "aa": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "reprob": 0.0,
                            "remode": "pixel", "recount": 1})
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # keeps 0 bits
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getpixel((0, 0)) == (0, 0, 0)
