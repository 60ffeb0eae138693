"""Domain data through the commands: 1-channel 16-bit PNG and 4-channel .npy pre-training, conversion and
fine-tuning; mean/std 'auto' stored and reused; continued pre-training with --init; one-line errors."""

import argparse
import re

import pytest
import safetensors.torch
import timm
import torch
import yaml

from fcmae.data.demo import build_demo_folder
from fcmae.model import build_fcmae
from fcmae.pretrain import main as main_pretrain
from fcmae.pretrain.init import apply_init, check_fits, read_init
from fcmae.runtime.errors import UsageError
from fcmae.runtime.logs import read_jsonl
from fcmae.weights.conversion import to_timm
from fcmae.weights.layouts import to_reference, to_reference_fcmae
from finetune.convert import main as convert_main
from finetune.knn import main as knn_main
from finetune.main_finetune import main as finetune_main
from tests.helpers import CPU_ARGS, TINY_ARGS, randomize_

DEPTHS, DIMS = (1, 1, 1, 1), (8, 16, 16, 16)  # TINY_ARGS
PRE = [*TINY_ARGS, *CPU_ARGS, "--decoder_dim", "16", "--input_size", "64", "--mask_ratio", "0.5", "--epochs", "1",
       "--warmup_epochs", "0", "--batch_size", "8", "--effective_batch", "8", "--vis_images", "2"]
FT = [*TINY_ARGS, *CPU_ARGS, "--input_size", "32", "--batch_size", "8", "--effective_batch", "8", "--epochs", "1",
      "--warmup_epochs", "0", "--model_ema", "false", "--print_every", "4"]


def run(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, f"{main.__module__} {argv} exited with {e.value.code}"


def fails(main, argv, capsys, *fragments):
    """The command exits with 2 and one error line holding every fragment."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "error:" in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def stored_config(out):
    return yaml.safe_load((out / "config.yaml").read_text())


def checkpoint_config(path):
    return torch.load(path, map_location="cpu", weights_only=True)["config"]


@pytest.fixture(scope="module")
def png16(tmp_path_factory):
    """1-channel 16-bit PNGs: train/ (2 per photo) and val/ (1 per photo), one class per photograph."""
    return build_demo_folder(tmp_path_factory.mktemp("cache"), crop_size=64, train_per_photo=2, val_per_photo=1,
                             fmt="png16")


@pytest.fixture(scope="module")
def npy4(tmp_path_factory):
    """4-channel uint16 (C, H, W) .npy arrays, laid out as `png16`."""
    return build_demo_folder(tmp_path_factory.mktemp("cache"), crop_size=64, train_per_photo=2, val_per_photo=1,
                             fmt="npy4")


@pytest.mark.slow
def test_png16_one_channel_pretrain_convert_finetune_with_auto_mean_std(png16, tmp_path, capsys):
    pre, dense, ft = tmp_path / "pre", tmp_path / "dense.pth", tmp_path / "ft"
    run(main_pretrain.main, ["atto", "demo", *PRE, "--data_path", str(png16), "--in_chans", "1", "--mean", "auto",
                             "--std", "auto", "--knn_data_path", str(png16), "--knn_every", "1",
                             "--output_dir", str(pre)])
    text = capsys.readouterr().out
    assert "kNN monitor: " in text and re.search(r"epoch 1/1 done: .*knn", text)  # the monitor reads them too
    assert "channel statistics from 36 images" in text and "of 1 channel(s) of uint16" in text
    config = stored_config(pre)
    mean, std = config["mean"], config["std"]
    assert len(mean) == len(std) == 1 and 0.05 < mean[0] < 0.95 and 0.01 < std[0] < 0.5  # computed, not 0/1
    assert f"normalisation mean {mean}, std {std}" in text
    saved = checkpoint_config(pre / "checkpoint-last.pth")
    assert (saved["in_chans"], saved["mean"], saved["std"]) == (1, mean, std)
    assert (pre / "reconstruction.png").is_file()
    # fcmae-knn on the checkpoint takes its channels, normalisation and size: the monitor's last result, no flags.
    monitor = [r for r in read_jsonl(pre / "log.jsonl") if r["type"] == "knn"][-1]
    capsys.readouterr()
    run(knn_main, [str(pre / "checkpoint-last.pth"), "--data_path", str(png16), "--device", "cpu",
                   "--num_workers", "0"])
    text = capsys.readouterr().out
    assert f"1 channel(s), mean {mean}, std {std}" in text
    assert f"top-1 {monitor['top1']:.2f}%" in text and "at 64x64, crop_pct 0.875" in text

    # A resumed run reuses the stored values instead of computing them again.
    run(main_pretrain.main, ["atto", "demo", *PRE, "--data_path", str(png16), "--in_chans", "1", "--mean", "auto",
                             "--std", "auto", "--epochs", "2", "--allow_config_change", "--output_dir", str(pre)])
    text = capsys.readouterr().out
    assert "channel statistics" not in text and "resumed from" in text
    assert stored_config(pre)["mean"] == mean

    run(convert_main, [str(pre / "checkpoint-last.pth"), str(dense)])
    weights = torch.load(dense, weights_only=True)
    assert weights["stem.0.weight"].shape[1] == 1
    model = timm.create_model("convnextv2_atto", pretrained=False, depths=DEPTHS, dims=DIMS, in_chans=1,
                              num_classes=3, conv_mlp=False)  # a custom size: written with Linear MLPs
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)

    # Fine-tuning from the FCMAE checkpoint takes its normalisation (mean/std left null).
    capsys.readouterr()
    run(finetune_main, ["atto", str(pre / "checkpoint-last.pth"), *FT, "--data_path", str(png16), "--in_chans", "1",
                        "--output_dir", str(ft)])
    text = capsys.readouterr().out
    assert "normalisation from the pre-training checkpoint" in text and "channel statistics" not in text
    assert (stored_config(ft)["mean"], stored_config(ft)["std"]) == (mean, std)
    assert checkpoint_config(ft / "checkpoint-last.pth")["mean"] == mean
    # --eval of the fine-tuned checkpoint normalises as its training did.
    run(finetune_main, ["atto", *FT, "--data_path", str(png16), "--eval", "true", "--resume",
                        str(ft / "checkpoint-last.pth")])  # in_chans too is the checkpoint's
    text = capsys.readouterr().out
    assert "normalisation from the fine-tuning checkpoint" in text and "eval model: top-1" in text
    assert "in_chans 1" in text and (ft / "eval.jsonl").is_file()
    # From the converted file (no config inside): null means auto for 16-bit data, computed from train/.
    run(finetune_main, ["atto", str(dense), *FT, "--data_path", str(png16), "--in_chans", "1",
                        "--output_dir", str(tmp_path / "ft2")])
    assert "channel statistics from 36 images" in capsys.readouterr().out
    # Weights for 1 channel into a 3-channel run, and 1-channel images in one: one line saying what to set.
    fails(finetune_main, ["atto", str(dense), *FT, "--data_path", str(png16), "--output_dir", str(tmp_path / "f3")],
          capsys, "stem for 1 input channel(s)", "--in_chans 1")
    fails(finetune_main, ["atto", "none", *FT, "--data_path", str(png16), "--output_dir", str(tmp_path / "f4")],
          capsys, ".png has 1 channel(s)", "in_chans=3")


def test_npy4_four_channel_pretrain_convert_finetune(npy4, tmp_path, capsys):
    pre, dense, ft = tmp_path / "pre", tmp_path / "dense.pth", tmp_path / "ft"
    run(main_pretrain.main, ["atto", "demo", *PRE, "--data_path", str(npy4), "--in_chans", "4",
                             "--output_dir", str(pre)])
    text = capsys.readouterr().out
    assert "channel statistics from 36 images" in text  # null: auto for data other than 3-channel 8-bit
    mean = stored_config(pre)["mean"]
    assert len(mean) == 4 and mean[3] == pytest.approx(0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2], abs=0.01)
    run(convert_main, [str(pre / "checkpoint-last.pth"), str(dense)])
    assert "max |diff|" in capsys.readouterr().out
    explicit = ["--mean", "[0.4, 0.4, 0.4, 0.4]", "--std", "[0.25, 0.25, 0.25, 0.25]"]
    run(finetune_main, ["atto", str(dense), *FT, "--data_path", str(npy4), "--in_chans", "4", *explicit,
                        "--layout", "CHW", "--output_dir", str(ft)])
    text = capsys.readouterr().out
    assert "loaded      " in text and "normalisation mean [0.4, 0.4, 0.4, 0.4]" in text
    assert stored_config(ft)["std"] == [0.25] * 4
    epoch = [line for line in (ft / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert epoch and '"acc1"' in epoch[-1]


@pytest.mark.parametrize("main, flags", [(main_pretrain.main, ["demo"]), (finetune_main, [])])
def test_mean_std_of_the_wrong_length_is_a_one_line_error(png16, tmp_path, capsys, main, flags):
    base = ["atto", *flags, "--data_path", str(png16), "--in_chans", "1", "--output_dir", str(tmp_path / "o")]
    fails(main, base + ["--mean", "[0.5, 0.5, 0.5]", "--std", "[0.2]"], capsys, "mean has 3 value(s)", "in_chans=1")
    fails(main, base + ["--mean", "auto", "--std", "[0.2, 0.2]"], capsys, "std has 2 value(s)")
    fails(main, base + ["--mean", "[0.5]", "--std", "[0]"], capsys, "std values must be finite and positive")
    fails(main, base + ["--mean", "mean"], capsys, "'auto', or a list")
    assert not (tmp_path / "o" / "checkpoint-last.pth").exists()


def test_pretraining_a_folder_of_another_channel_count_names_a_file(png16, tmp_path, capsys):
    fails(main_pretrain.main, ["atto", "demo", *PRE, "--data_path", str(png16), "--output_dir", str(tmp_path / "o")],
          capsys, ".png has 1 channel(s)", "in_chans=3")


# ---------------------------------------------------------------- --init: continued pre-training
def fcmae_checkpoint(path, in_chans=3, dims=DIMS, decoder_dim=16, seed=0, reference=False):
    """A randomised tiny FCMAE's weights as a training checkpoint, in this project's or the reference's layout."""
    torch.manual_seed(seed)
    model = randomize_(build_fcmae("atto", img_size=64, depths=DEPTHS, dims=dims, decoder_dim=decoder_dim,
                                   in_chans=in_chans), seed)
    state = model.state_dict()
    if reference:
        encoder = to_timm({k: v for k, v in state.items() if k.startswith("encoder.")}, conv_mlp=False)
        decoder = to_reference({k: v for k, v in state.items() if not k.startswith("encoder.")})
        state = {**to_reference_fcmae(encoder), **decoder}
    extra = {"args": argparse.Namespace(model="convnextv2_atto", epochs=800)} if reference else {}
    torch.save({"model": state, "epoch": 799, **extra}, path)  # the reference's checkpoints hold its `args`
    return model


@pytest.mark.parametrize("reference", [False, True], ids=["fcmae", "reference-fcmae"])
def test_init_loads_encoder_and_decoder_exactly(tmp_path, reference):
    source = fcmae_checkpoint(tmp_path / "w.pth", reference=reference)
    init = read_init(tmp_path / "w.pth")
    assert init.source_format == ("reference-fcmae" if reference else "fcmae") and init.decoder_shape == (16, 1)
    model = build_fcmae("atto", img_size=64, depths=DEPTHS, dims=DIMS, decoder_dim=16)
    lines = apply_init(model, init)
    assert lines[0].startswith("init: encoder and decoder from") and len(lines) == 1
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_init_adapts_the_stem_from_3_channels_and_starts_pred_afresh(tmp_path):
    source = fcmae_checkpoint(tmp_path / "w.pth", in_chans=3)
    init = read_init(tmp_path / "w.pth")
    for in_chans, expected in ((1, source.encoder.stem[0].weight.sum(1, keepdim=True)),
                               (4, source.encoder.stem[0].weight[:, [0, 1, 2, 0]] * 3 / 4)):
        torch.manual_seed(1)
        model = build_fcmae("atto", img_size=64, depths=DEPTHS, dims=DIMS, decoder_dim=16, in_chans=in_chans)
        fresh_pred = model.pred.weight.detach().clone()
        text = "\n".join(apply_init(model, init))
        assert f"stem adapted from 3 to {in_chans} input channel(s)" in text and "pred newly initialised" in text
        torch.testing.assert_close(model.encoder.stem[0].weight, expected)
        torch.testing.assert_close(model.encoder.stem[0].bias, source.encoder.stem[0].bias)
        torch.testing.assert_close(model.proj.weight, source.proj.weight)
        torch.testing.assert_close(model.pred.weight, fresh_pred)


def test_init_from_an_encoder_only_file_keeps_the_fresh_decoder(tmp_path):
    source = fcmae_checkpoint(tmp_path / "w.pth")
    encoder = to_timm({k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}, conv_mlp=True)
    path = tmp_path / "timm.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in encoder.items()}, str(path))
    model = build_fcmae("atto", img_size=64, depths=DEPTHS, dims=DIMS, decoder_dim=32, decoder_depth=2)
    check_fits(read_init(path), DEPTHS, DIMS, 32, 2)  # no decoder in the file: any decoder fits
    text = "\n".join(apply_init(model, read_init(path)))
    assert "decoder (proj, mask_token, decoder, pred) newly initialised" in text
    torch.testing.assert_close(model.encoder.stages[3].blocks[0].mlp.fc1.weight,
                               source.encoder.stages[3].blocks[0].mlp.fc1.weight)


def test_init_through_the_command(png16, tmp_path, capsys):
    init = tmp_path / "imagenet_fcmae.pth"
    fcmae_checkpoint(init, in_chans=3)
    out = tmp_path / "pre"
    args = ["atto", "demo", *PRE, "--data_path", str(png16), "--in_chans", "1", "--init", str(init),
            "--output_dir", str(out)]
    run(main_pretrain.main, args)
    text = capsys.readouterr().out
    assert f"init: encoder and decoder from {init} (fcmae weights)" in text
    assert "stem adapted from 3 to 1 input channel(s) as timm adapts input convolutions (summed" in text
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert saved["run_state"]["epoch"] == 1 and saved["config"]["init"] == str(init)  # a new run: epoch 1, not 800
    # A checkpoint to resume wins over --init, and says so.
    run(main_pretrain.main, args[:-2] + ["--epochs", "2", "--allow_config_change", "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert "is not used: resuming" in text and "init: encoder" not in text


def test_init_of_another_size_or_decoder_is_a_one_line_error(png16, tmp_path, capsys):
    other_size, other_decoder = tmp_path / "other_size.pth", tmp_path / "other_decoder.pth"
    fcmae_checkpoint(other_size, dims=(8, 16, 16, 24))
    fcmae_checkpoint(other_decoder, decoder_dim=32)
    base = ["atto", "demo", *PRE, "--data_path", str(png16), "--in_chans", "1", "--output_dir", str(tmp_path / "o")]
    err = fails(main_pretrain.main, base + ["--init", str(other_size)], capsys, str(other_size),
                "dims [8, 16, 16, 24]", "this run pre-trains")
    assert re.search(r"pass the checkpoint's size", err)
    fails(main_pretrain.main, base + ["--init", str(other_decoder)], capsys, str(other_decoder),
          "decoder of 1 block(s) of width 32", "--decoder_dim 32")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    fails(main_pretrain.main, base + ["--init", str(tmp_path / "junk.pth")], capsys, "junk.pth")
    fails(main_pretrain.main, base + ["--init", str(tmp_path / "missing.pth")], capsys, "missing.pth", "not found")
    assert not (tmp_path / "o" / "checkpoint-last.pth").exists()


def test_checkpoints_from_before_the_data_settings_still_resume(png16, tmp_path):
    from fcmae.runtime.resume import meaningful_changes

    cfg = main_pretrain.resolve_config(["atto", "demo", *PRE, "--data_path", str(png16)])
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("in_chans", "mean", "std", "decode", "layout", "init")}
    saved = {"model": {}, "config": old, "run_state": {}}
    resumed = main_pretrain.check_resumable(saved, cfg, "old.pth")
    assert resumed.mean == (0.485, 0.456, 0.406)  # what the pipeline of that time normalised with
    assert meaningful_changes(saved["config"], resumed.to_dict(), main_pretrain.HARMLESS) == ([], [])
    with pytest.raises(UsageError, match="in_chans: checkpoint 3, this run 1"):
        main_pretrain.check_resumable({"model": {}, "config": old, "run_state": {}}, cfg.replace(in_chans=1), "x")
