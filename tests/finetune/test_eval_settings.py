"""Evaluation as training was: --eval takes the input size, crop and data format stored in the checkpoint it
evaluates (given flags win, with a note) and writes eval.jsonl beside it; fine-tuning starts at its pre-training
checkpoint's input size; checkpoint-best.pth holds the best epoch (finetune/main_finetune.py,
finetune/checkpoint_settings.py)."""

import json

import pytest
import torch

from fcmae import build_fcmae
from fcmae.pretrain.config import resolve_config as resolve_pretrain
from fcmae.runtime.config import load_yaml
from finetune import main_finetune as ft
from finetune.checkpoint_settings import settings_from_checkpoint
from tests.finetune.test_finetune import make_folder, run_finetune
from tests.helpers import TINY_ARGS, tiny_args

CPU = ["--device", "cpu", "--num_workers", "0", "--batch_size", "3", "--effective_batch", "3", "--print_every", "100"]
AT_96 = ["--input_size", "96", "--crop_pct", "1.0"]


def finetune_args(data, out, *extra, weights="none"):
    """A short fine-tuning of the tiny model on `data` into `out` (no augmentation, EMA off unless `extra` says)."""
    return ["atto", str(weights), "--data_path", str(data), "--output_dir", str(out), *TINY_ARGS, *CPU,
            "--epochs", "1", "--warmup_epochs", "0", "--model_ema", "false", "--aa", "none", "--mixup", "0",
            "--cutmix", "0", "--reprob", "0", *extra]


def eval_args(data, checkpoint, *extra):
    """--eval of `checkpoint` on `data` with no size, crop or output flags."""
    return ["atto", "--data_path", str(data), *TINY_ARGS, *CPU, "--eval", "true", "--resume", str(checkpoint),
            *extra]


def records(path, kind):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == kind]


@pytest.fixture(scope="module")
def at_96(tmp_path_factory):
    """(data, output folder) of a model fine-tuned at 96 pixels with crop_pct 1.0 (stored in its config)."""
    tmp = tmp_path_factory.mktemp("at_96")
    data, out = make_folder(tmp / "data", per_class=2), tmp / "ft"
    with pytest.raises(SystemExit) as e:
        ft.main(finetune_args(data, out, *AT_96))
    assert e.value.code == 0
    return data, out


# ---------------------------------------------------------------- --eval
def test_eval_gives_the_same_loss_with_and_without_repeating_the_training_size(at_96, tmp_path, capsys,
                                                                                monkeypatch):
    data, out = at_96
    monkeypatch.chdir(tmp_path)  # the default output folder, should anything use it, is not the repository's
    checkpoint = out / "checkpoint-last.pth"
    code, text, err = run_finetune(eval_args(data, checkpoint), capsys)
    assert code == 0, err
    assert f"from the checkpoint {checkpoint}: input_size 96, crop_pct 1.0, in_chans 3, layout auto" in text
    assert f"images of {data / 'val'} at 96x96, crop_pct 1.0, checkpoint {checkpoint})" in text
    assert f"results appended to {out / 'eval.jsonl'}" in text  # beside the checkpoint: no --output_dir given
    code, text, err = run_finetune(eval_args(data, checkpoint, *AT_96), capsys)
    assert code == 0, err
    assert "note:" not in text
    plain, repeated = records(out / "eval.jsonl", "eval")
    assert plain == repeated
    assert (plain["input_size"], plain["crop_pct"], plain["checkpoint"]) == (96, 1.0, str(checkpoint))
    assert not (tmp_path / "output").exists()


def test_eval_flags_that_differ_from_the_checkpoint_win_with_a_note(at_96, tmp_path, capsys):
    data, out = at_96
    checkpoint = out / "checkpoint-last.pth"
    code, text, err = run_finetune(eval_args(data, checkpoint, "--input_size", "64", "--output_dir",
                                             str(tmp_path / "elsewhere")), capsys)
    assert code == 0, err
    assert f"note: input_size 64 as given, 96 in the checkpoint {checkpoint}; using 64" in text
    assert "at 64x64, crop_pct 1.0" in text  # crop_pct was not given: the checkpoint's
    (record,) = records(tmp_path / "elsewhere" / "eval.jsonl", "eval")  # --output_dir given: there
    assert (record["input_size"], record["crop_pct"]) == (64, 1.0)


def test_stored_settings_keep_what_the_user_gave():
    current = {"input_size": 224, "crop_pct": 0.875, "mean": None}
    stored = {"input_size": 96, "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5]}
    found = settings_from_checkpoint(current, stored, ("input_size", "crop_pct", "mean"), {"crop_pct"}, "CKPT")
    assert found.changes == {"input_size": 96, "mean": [0.5, 0.5, 0.5]}
    assert found.lines() == ["from CKPT: input_size 96, mean [0.5, 0.5, 0.5]",
                             "note: crop_pct 0.875 as given, 1.0 in CKPT; using 0.875"]
    nothing = settings_from_checkpoint(current, None, ("input_size",), (), "CKPT")  # converted files store none
    assert nothing.changes == {} and nothing.lines() == []


# ---------------------------------------------------------------- fine-tuning from a pre-training checkpoint
def test_finetuning_starts_at_the_pretraining_input_size(tmp_path, capsys):
    """A pre-training checkpoint stores its run's config (input_size 64 here); fine-tuning from it without
    --input_size trains at 64, says so in the plan, and resumes at 64 when run again."""
    data = make_folder(tmp_path / "data", per_class=2)
    pretrain_config = resolve_pretrain(tiny_args(data, tmp_path / "pre")).to_dict()
    fcmae = build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=32)
    weights = tmp_path / "pre.pth"
    torch.save({"model": fcmae.state_dict(), "config": pretrain_config}, weights)
    assert pretrain_config["input_size"] == 64

    out = tmp_path / "ft"
    code, text, err = run_finetune(finetune_args(data, out, "--dry_run", weights=weights), capsys)  # reads no weights
    assert code == 0 and "images           224x224, evaluated with crop_pct 0.875 (or the checkpoint's" in text, err
    code, text, err = run_finetune(finetune_args(data, out, weights=weights), capsys)
    assert code == 0, err
    assert f"images           64x64, evaluated with crop_pct 0.875 (input_size from the pre-training " \
           f"checkpoint {weights})" in text
    assert load_yaml(out / "config.yaml")["input_size"] == 64
    # The same command again resumes at the run's own size (224 would be a change of settings that stops it).
    code, text, err = run_finetune(finetune_args(data, out, weights=weights), capsys)
    assert code == 0, err
    assert f"from the fine-tuning checkpoint {out / 'checkpoint-last.pth'}: input_size 64, crop_pct 0.875" in text
    assert "nothing to do: 1 of 1 epochs already done" in text

    code, text, err = run_finetune(finetune_args(data, tmp_path / "ft32", "--input_size", "32", weights=weights),
                                   capsys)
    assert code == 0, err
    assert f"note: input_size 32 as given, 64 in the pre-training checkpoint {weights}; using 32" in text
    assert load_yaml(tmp_path / "ft32" / "config.yaml")["input_size"] == 32


# ---------------------------------------------------------------- checkpoint-best.pth
def best_epoch(out):
    """(epoch, top-1, weights) of the best validation top-1 in log.jsonl: the first epoch that reached it."""
    best = None
    for r in records(out / "log.jsonl", "epoch"):
        for top, weights in ((r["acc1"], "model"), (r.get("ema_acc1", -1.0), "EMA")):
            if best is None or top > best[1]:
                best = (r["epoch"], top, weights)
    return best


def test_best_checkpoint_holds_the_best_epochs_weights(tmp_path, capsys):
    data, out = make_folder(tmp_path / "data", per_class=3), tmp_path / "ft"
    code, text, err = run_finetune(finetune_args(data, out, "--epochs", "3", "--blr", "1.0", "--model_ema", "true",
                                                 "--model_ema_decay", "0.5", "--save_every", "1",
                                                 "--keep_checkpoints", "0", "--input_size", "32"), capsys)
    assert code == 0, err
    epoch, top, weights = best_epoch(out)
    assert epoch < 3, "a case where the last epoch is not the best one"
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    same_epoch = torch.load(out / f"checkpoint-{epoch:04d}.pth", weights_only=True)
    assert best["run_state"]["epoch"] == epoch
    for part in ("model", "ema"):
        for key, value in same_epoch[part].items():
            assert torch.equal(best[part][key], value), (part, key)
    last = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert last["best"] == {"acc1": top, "epoch": epoch, "weights": weights,
                            "checkpoint": str(out / "checkpoint-best.pth")}
    assert f"best top-1 {top:.2f}% ({weights}, epoch {epoch}) in {out / 'checkpoint-best.pth'}" in text

    # --eval of it reproduces the best epoch's top-1.
    code, text, err = run_finetune(eval_args(data, out / "checkpoint-best.pth"), capsys)
    assert code == 0, err
    (record,) = records(out / "eval.jsonl", "eval")
    assert record["model_acc1" if weights == "model" else "ema_acc1"] == pytest.approx(top)


def test_resume_keeps_the_best_record(tmp_path, capsys):
    """Stopped after epoch 1 (the best), then resumed: the later, worse epoch does not replace checkpoint-best.pth."""
    data = make_folder(tmp_path / "data", per_class=3)  # 9 training images: 3 steps per epoch

    def two_epochs(out, *extra):
        return finetune_args(data, out, "--epochs", "2", "--blr", "1e-3", "--input_size", "32", *extra)

    code, _, err = run_finetune(two_epochs(tmp_path / "a"), capsys)
    assert code == 0, err
    assert best_epoch(tmp_path / "a")[0] == 1, "a case where the epoch before the stop is the best"
    assert run_finetune(two_epochs(tmp_path / "b", "--exit_after_steps", "4"), capsys)[0] == 0
    assert torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)["run_state"]["epoch"] == 1
    assert run_finetune(two_epochs(tmp_path / "b"), capsys)[0] == 0
    whole, resumed = (torch.load(tmp_path / run / "checkpoint-last.pth", weights_only=True) for run in "ab")
    assert {**resumed["best"], "checkpoint": None} == {**whole["best"], "checkpoint": None}
    assert resumed["best"]["epoch"] == 1
    best_whole, best_resumed = (torch.load(tmp_path / run / "checkpoint-best.pth", weights_only=True) for run in "ab")
    assert best_resumed["run_state"]["epoch"] == 1
    for key, value in best_whole["model"].items():
        assert torch.equal(best_resumed["model"][key], value), key
