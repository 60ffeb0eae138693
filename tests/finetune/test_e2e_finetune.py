"""The demo chain on a tiny config: pre-train -> convert -> fine-tune -> evaluate, plus resume.

The same commands as the README's demo chain, with a tiny
model, 64-pixel crops and one or two epochs, so it runs in CI in well under
two minutes on a CPU.
"""

import json

import pytest
import torch

from fcmae.pretrain.main import main as pretrain_main
from finetune.convert import main as convert_main
from finetune.main_finetune import main as finetune_main
from tests.helpers import CPU_ARGS, TINY_ARGS

ARCH, RUN = TINY_ARGS, CPU_ARGS
FT_DATA = ["--demo", "--input_size", "32", "--demo_crop_size", "64", "--demo_train_per_photo", "2",
           "--demo_val_per_photo", "2", "--batch_size", "8", "--effective_batch", "8", "--print_every", "4"]


def run(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, f"{main.__module__} {argv} exited with {e.value.code}"


def records(path, kind):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == kind]


@pytest.mark.slow
def test_pretrain_convert_finetune_evaluate(tmp_path, demo_cache, capsys):
    pre, dense, out = tmp_path / "pre", tmp_path / "dense.pth", tmp_path / "ft"
    run(pretrain_main, ["atto", "demo", *ARCH, *RUN, "--decoder_dim", "16", "--input_size", "64",
                        "--mask_ratio", "0.5", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8",
                        "--effective_batch", "8", "--demo_crop_size", "64", "--demo_per_photo", "2",
                        "--vis_images", "0", "--output_dir", str(pre)])
    run(convert_main, [str(pre / "checkpoint-last.pth"), str(dense)])
    text = capsys.readouterr().out
    assert "fcmae weights" in text and "max |diff|" in text and "dropped" in text

    run(finetune_main, ["atto", str(dense), *ARCH, *RUN, *FT_DATA, "--epochs", "2", "--warmup_epochs", "1",
                        "--model_ema", "true", "--model_ema_decay", "0.5", "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert "loaded      " in text and "missing     4 (newly initialised)" in text
    epochs = records(out / "log.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["acc1"] <= r["acc5"] <= 100 and "ema_acc1" in r for r in epochs)
    assert (out / "tensorboard").is_dir() and (out / "config.yaml").is_file()

    # --eval with the checkpoint evaluates only and reproduces the last epoch's numbers.
    run(finetune_main, ["atto", *ARCH, *RUN, *FT_DATA, "--eval", "true", "--resume",
                        str(out / "checkpoint-last.pth"), "--output_dir", str(out)])
    result = records(out / "eval.jsonl", "eval")[-1]
    assert result["model_acc1"] == pytest.approx(epochs[-1]["acc1"])
    assert result["ema_acc1"] == pytest.approx(epochs[-1]["ema_acc1"])
    assert result["model_count"] == 36  # 18 classes x 2 val crops

    # The FCMAE checkpoint itself also works as CHECKPOINT (converted on the fly).
    run(finetune_main, ["atto", str(pre / "checkpoint-last.pth"), *ARCH, *RUN, *FT_DATA, "--epochs", "1",
                        "--model_ema", "false", "--output_dir", str(tmp_path / "ft2")])
    assert "(fcmae)" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_result(tmp_path, demo_cache):
    common = ["atto", "none", *ARCH, *RUN, *FT_DATA, "--epochs", "2", "--warmup_epochs", "1",
              "--mixup", "0.8", "--cutmix", "1.0", "--model_ema", "true", "--model_ema_decay", "0.5"]
    run(finetune_main, common + ["--output_dir", str(tmp_path / "a")])
    # Pre-empted after 3 optimizer steps (mid-epoch 1), then the same command again.
    run(finetune_main, common + ["--output_dir", str(tmp_path / "b"), "--exit_after_steps", "3"])
    stopped = torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=False)["run_state"]
    assert (stopped["epoch"], stopped["iteration"], stopped["step"]) == (0, 3, 3)
    run(finetune_main, common + ["--output_dir", str(tmp_path / "b")])
    a, b = (records(tmp_path / d / "log.jsonl", "epoch") for d in "ab")
    assert [r["acc1"] for r in a] == [r["acc1"] for r in b]
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-6)
    ca, cb = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=False) for d in "ab")
    for key, value in ca["model"].items():
        torch.testing.assert_close(cb["model"][key], value, rtol=1e-6, atol=1e-7)
