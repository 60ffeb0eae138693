"""The pre-training command end to end on CPU: outputs, exact resume, stops, bad input."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.errors import NonFiniteLossError
from fcmae.runtime.logs import read_jsonl
from tests.helpers import build_with_nan_loss, epoch_losses, single_process_env, tiny_args, train_losses, write_images

REPO = Path(__file__).resolve().parents[2]


def run(args):
    return main_pretrain.run(main_pretrain.resolve_config(args))


@pytest.fixture(scope="module")
def reference_run(image_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run; other tests compare against it."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run(tiny_args(image_dir, out)) == 0
    return out


def test_run_writes_checkpoints_logs_and_pictures(reference_run):
    out = reference_run
    assert (out / "checkpoint-last.pth").is_file()
    assert sorted(p.name for p in ckpt.numbered_checkpoints(out)) == ["checkpoint-0001.pth", "checkpoint-0002.pth"]
    assert (out / "config.yaml").is_file()
    assert (out / "reconstruction.png").is_file()
    picture = np.asarray(Image.open(out / "reconstruction.png"))
    grid_height = 2 * 64 + 2  # two images, below a band with the epoch and the columns' titles
    assert picture.shape[1:] == (4 * 64 + 3 * 2, 3) and picture.shape[0] > grid_height
    assert (picture[:-grid_height] < 128).any()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    losses = train_losses(out)
    assert [s for s, _ in losses] == list(range(1, 13))  # 24 images / batch 4 = 6 steps per epoch
    assert all(np.isfinite(v) for _, v in losses)
    state = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert state["run_state"]["epoch"] == 2 and state["step"] == 12
    for key in ("model", "optimizer", "scaler", "rng", "config"):
        assert key in state
    assert state["config"]["dims"] == [8, 16, 16, 16]
    assert any(k.startswith("encoder.stages.") for k in state["model"])


def test_every_log_record_counts_epochs_from_1(reference_run):
    records = read_jsonl(reference_run / "log.jsonl")
    train = [(r["epoch"], r["iteration"]) for r in records if r["type"] == "train"]
    assert train == [(epoch, iteration) for epoch in (1, 2) for iteration in range(1, 7)]  # print_every 1
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]


def test_resume_after_preemption_mid_epoch_is_exact(image_dir, tmp_path, reference_run, capsys):
    out = tmp_path / "out"
    assert run(tiny_args(image_dir, out, "--exit_after_steps", "3")) == 0
    assert "stopped by" in capsys.readouterr().out
    state = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert (state["run_state"]["epoch"], state["run_state"]["iteration"], state["step"]) == (0, 3, 3)
    assert run(tiny_args(image_dir, out)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert train_losses(out) == train_losses(reference_run)
    assert epoch_losses(out) == epoch_losses(reference_run)
    last = (out / "checkpoint-last.pth").read_bytes()
    assert run(tiny_args(image_dir, out)) == 0  # the same command once more: nothing left to do
    assert "nothing to do: 2 of 2 epochs already done" in capsys.readouterr().out
    assert (out / "checkpoint-last.pth").read_bytes() == last and train_losses(out) == train_losses(reference_run)


def test_resume_from_epoch_checkpoint_after_a_kill_is_exact(image_dir, tmp_path, reference_run):
    # A SIGKILL during epoch 2 leaves epoch 1's checkpoint as the newest.
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(reference_run / "checkpoint-0001.pth", out / "checkpoint-last.pth")
    assert run(tiny_args(image_dir, out)) == 0
    assert epoch_losses(out)[-1] == epoch_losses(reference_run)[-1]
    assert train_losses(out) == train_losses(reference_run)[6:]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(image_dir, tmp_path, monkeypatch):
    build_with_nan = build_with_nan_loss(main_pretrain.build_fcmae, at_call=9)

    monkeypatch.setattr(main_pretrain, "build_fcmae", build_with_nan)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, iteration 2 \(optimizer step 9\).*checkpoint-last"):
        run(tiny_args(image_dir, out))
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == 6


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.slow
def test_stop_signal_saves_and_exits_cleanly(image_dir, tmp_path, signum):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fcmae.pretrain.main", *tiny_args(image_dir, out, "--epochs", "50")],
                            cwd=REPO, env=single_process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/50  step 2/"):
            proc.send_signal(signum)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + rest
    assert f"stopped by {signal.Signals(signum).name}" in rest
    state = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert 2 <= state["step"] < 50 * 6


# ---------------------------------------------------------------- bad input
def expect_usage_error(args, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err


@pytest.mark.parametrize("change, match", [
    ({"--input_size": "80"}, "multiple of 32"),
    ({"--mask_ratio": "1.0"}, "mask_ratio must be in (0, 1)"),
    ({"--mask_ratio": "0"}, "mask_ratio must be in (0, 1)"),
    ({"--mask_ratio": "0.8"}, "leaves no visible patch"),
    ({"--batch_size": "64", "--effective_batch": "64", "--update_freq": "1"}, "batch larger than the data set"),
    ({"--no_such_key": "1"}, "unknown config key 'no_such_key'"),
    ({"--amp": "fp8"}, "amp must be one of"),
])
def test_bad_settings_fail_before_compute(image_dir, tmp_path, capsys, change, match):
    args = tiny_args(image_dir, tmp_path / "out")
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    expect_usage_error(args, match, capsys)
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_unknown_size_and_schedule(capsys):
    expect_usage_error(["giant", "demo"], "unknown ConvNeXt V2 size 'giant'", capsys)
    expect_usage_error(["atto", "900ep"], "unknown schedule '900ep'", capsys)


def test_no_data_path_says_how_to_give_one(capsys):
    expect_usage_error(["huge", "800ep"], "--data_path", capsys)


def test_bad_data_paths(tmp_path, capsys):
    expect_usage_error(tiny_args(tmp_path / "missing", tmp_path / "o1"), "does not exist", capsys)
    (tmp_path / "empty").mkdir()
    expect_usage_error(tiny_args(tmp_path / "empty", tmp_path / "o2"), "is empty", capsys)
    (tmp_path / "noimg" / "train").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "notes.txt").write_text("hello")
    expect_usage_error(tiny_args(tmp_path / "noimg", tmp_path / "o3"), "no images found", capsys)


def test_output_dir_not_writable(image_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    expect_usage_error(tiny_args(image_dir, blocker / "out"), "is not writable", capsys)


def test_resume_of_another_model_or_a_broken_file_is_refused(image_dir, tmp_path, reference_run, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(reference_run / "checkpoint-last.pth", out / "checkpoint-last.pth")
    args = tiny_args(image_dir, out)
    args[args.index("--dims") + 1] = "[8, 16, 16, 32]"
    expect_usage_error(args, "trained with another model (dims", capsys)
    expect_usage_error(["tiny", "demo"] + tiny_args(image_dir, out)[2:], "another model (size", capsys)
    data = (out / "checkpoint-last.pth").read_bytes()
    (out / "checkpoint-last.pth").write_bytes(data[: len(data) // 2])
    expect_usage_error(tiny_args(image_dir, out), "truncated or not a PyTorch checkpoint", capsys)


def test_unreadable_images_are_skipped_once_then_too_many_stop(image_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(image_dir, data)
    good = (data / "train" / "class_a" / "img_000.png").read_bytes()
    (data / "train" / "class_a" / "zz_truncated.png").write_bytes(good[: len(good) // 3])
    # 25 images, 1 bad, at most 10% (2) allowed: skipped, logged once over 2 epochs.
    assert run(tiny_args(data, tmp_path / "o1", "--max_bad_fraction", "0.1")) == 0
    logged = capsys.readouterr().out
    assert logged.count("skipping unreadable image") == 1 and "zz_truncated.png" in logged
    for i in range(4):
        (data / "train" / "class_b" / f"zz_bad_{i}.jpg").write_bytes(b"not an image at all")
    # 29 images, 5 bad: more than 10% -> a clear error.
    expect_usage_error(tiny_args(data, tmp_path / "o2", "--max_bad_fraction", "0.1"), "unreadable", capsys)


def test_reconstruction_batch_skips_images_the_training_set_skips(tmp_path, monkeypatch):
    from fcmae.data.folder import ImageFolderDataset

    write_images(tmp_path / "train", 3, size=16)
    write_images(tmp_path / "train" / "z", 1, size=72)  # the last file; 72 x 72 > 2 x MAX_IMAGE_PIXELS below
    # 64 x 64 crops stay under 2 x 2500 (Pillow 11 checks crops too)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)
    dataset = ImageFolderDataset(tmp_path / "train", input_size=64)
    assert dataset[3][1] and "DecompressionBombError" in dataset[3][1][0][1]  # skipped in training
    batch = dataset.fixed_batch(4)  # the reconstruction picture's batch: skipped there too, not a crash at start
    assert batch.shape == (3, 3, 64, 64)


def test_gradient_accumulation_resume_is_exact(image_dir, tmp_path, capsys):
    # batch 2 per iteration, effective 4: update_freq 2, 6 optimizer steps per epoch.
    accum = ("--batch_size", "2", "--effective_batch", "4")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(tiny_args(image_dir, ref, *accum)) == 0
    assert "accumulation     2" in capsys.readouterr().out
    assert [s for s, _ in train_losses(ref)] == list(range(1, 13))
    assert run(tiny_args(image_dir, out, *accum, "--exit_after_steps", "4")) == 0
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["run_state"]["iteration"] == 8
    assert run(tiny_args(image_dir, out, *accum)) == 0
    assert train_losses(out) == train_losses(ref)
