"""Export and safe loading: Hugging Face folders, safetensors, timm backbones from a file, refusing
checkpoints that would run code, and fine-tuning / evaluation at 384 pixels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import sparse
from fcmae.runtime import checkpoint as ckpt
from fcmae.weights import conversion as conversion_lib
from fcmae.weights import layouts
from fcmae.weights.io import WeightsError, read_weights, write_weights
from finetune import convert as cv
from finetune.model import read_pretrained
from tests.helpers import assert_close, randomize_

REPO = Path(__file__).resolve().parents[2]


def encoder_file(tmp_path, size="atto", depths=None, dims=None, seed=3, name="enc.pth", in_chans=3):
    """A random sparse encoder saved as a bare state dict; returns (encoder, path)."""
    encoder = randomize_(sparse.build_encoder(size, depths=depths, dims=dims, in_chans=in_chans), seed).eval()
    path = tmp_path / name
    torch.save(encoder.state_dict(), path)
    return encoder, path


def convert(argv):
    with pytest.raises(SystemExit) as e:
        cv.main([str(a) for a in argv])
    return e.value.code


def no_downloads(monkeypatch):
    """Make every timm download path fail loudly."""
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("timm tried to download weights")

    for name in ("download_cached_file", "load_state_dict_from_url", "load_state_dict_from_hf"):
        monkeypatch.setattr(builder, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("size, depths, dims, in_chans", [
    pytest.param("atto", None, None, 3, marks=pytest.mark.slow),  # the full atto model: ~3 s more than the others
    ("atto", (1, 2, 1, 1), (8, 16, 24, 32), 3), ("atto", (1, 1, 1, 1), (8, 16, 16, 16), 1)],
    ids=["atto", "custom", "one-channel"])
def test_hf_export_loads_cleanly_and_equals_timm(tmp_path, size, depths, dims, in_chans):
    transformers = pytest.importorskip("transformers", reason="transformers (the optional 'hf' extra) not installed")
    _, src = encoder_file(tmp_path, size, depths, dims, in_chans=in_chans)
    out = tmp_path / "hf"
    assert convert([src, out, "--format", "hf", "--no-verify"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "convnextv2" and config["num_channels"] == in_chans
    model, info = transformers.ConvNextV2Model.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    conversion = conversion_lib.load_weights(src)
    dense = conversion_lib.build_dense(conversion.depths, conversion.dims, conversion.conv_mlp,
                                       in_chans=in_chans).eval()
    dense.load_state_dict(conversion.state_dict, strict=False)
    imgs = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model.eval()(imgs, output_hidden_states=True)
        stages = dense.forward_intermediates(imgs, intermediates_only=True)
        assert_close(hf.last_hidden_state, dense.forward_features(imgs), rel=1e-5)
        assert len(hf.hidden_states) == 5
        for got, want in zip(hf.hidden_states[1:], stages):
            assert_close(got, want, rel=1e-5)


def test_hf_export_of_a_classifier_keeps_its_final_norm_and_drops_the_fc():
    pytest.importorskip("transformers", reason="transformers (the optional 'hf' extra) not installed")
    from fcmae.weights.hf import to_hf

    model = randomize_(conversion_lib.build_dense((1, 1, 1, 1), (8, 16, 16, 16), conv_mlp=False, num_classes=4), 1)
    weights, dropped = to_hf(model.state_dict())
    torch.testing.assert_close(weights["layernorm.weight"], model.state_dict()["head.norm.weight"])
    assert sorted(dropped) == ["head.fc.bias", "head.fc.weight"]


# ---------------------------------------------------------------- safetensors and timm backbones
def test_safetensors_output_loads_in_timm_backbone_without_download(tmp_path, monkeypatch):
    encoder, src = encoder_file(tmp_path)
    out = tmp_path / "atto.safetensors"
    assert convert([src, out, "--no-verify"]) == 0
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(conversion_lib.to_timm(encoder.state_dict()))  # really safetensors
    no_downloads(monkeypatch)
    backbone = timm.create_model("convnextv2_atto", pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(out))).eval()
    imgs = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stages = backbone(imgs)
        assert [f.shape[1] for f in stages] == [40, 80, 160, 320]
        assert_close(stages[-1], encoder(imgs), rel=1e-5)


def test_pth_output_loads_in_timm_backbone_without_download(tmp_path, monkeypatch):
    """The README's example: converted .pth weights as a timm features_only backbone."""
    encoder, src = encoder_file(tmp_path, seed=4)
    out = tmp_path / "atto_dense.pth"
    assert convert([src, out, "--no-verify"]) == 0
    no_downloads(monkeypatch)
    backbone = timm.create_model("convnextv2_atto", pretrained=True, features_only=True, out_indices=(3,),
                                 pretrained_cfg_overlay=dict(file=str(out))).eval()
    imgs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(backbone(imgs)[0], encoder(imgs), rel=1e-5)


def test_reference_format_cannot_be_written_as_safetensors(tmp_path, capsys):
    _, src = encoder_file(tmp_path, "atto", (1, 1, 1, 1), (8, 16, 16, 16))
    assert convert([src, tmp_path / "ref.safetensors", "--format", "reference", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "safetensors cannot hold" in err and len(err.strip().splitlines()) == 1


def test_safetensors_copies_only_tensors_that_share_memory(tmp_path, monkeypatch):
    base = torch.arange(12.0)
    state = {"tied.a": base[:6].view(2, 3), "tied.b": base[6:], "tied.t": base[:6].view(2, 3).t(),
             "alone": torch.ones(4), "view": torch.ones(3, 2).t()}
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone",
                        lambda t, *a, **k: clones.append(tuple(t.shape)) or real_clone(t, *a, **k))
    write_weights(state, tmp_path / "w.safetensors")
    assert sorted(clones) == [(2, 3), (3, 2), (6,)]  # a large model is not held three times while it is written
    back = read_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_safetensors_input_is_read(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    write_weights(state, tmp_path / "w.safetensors")
    back = read_weights(tmp_path / "w.safetensors")
    assert set(back) == {"a", "b"} and torch.equal(back["a"], state["a"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        read_weights(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- safe loading
class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious_checkpoint(tmp_path):
    _, src = encoder_file(tmp_path, "atto", (1, 1, 1, 1), (8, 16, 16, 16))
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.load(src, weights_only=True), "extra": RunsCode(marker)}, path)
    return path, marker


@pytest.mark.slow
def test_converter_refuses_a_checkpoint_that_would_run_code(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    result = subprocess.run([sys.executable, "-m", "finetune.convert", str(path), str(tmp_path / "out.pth")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcmae-convert: error: refused to load"), result.stderr
    assert "posix.mkdir" in lines[0] or "os.mkdir" in lines[0]
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_pretrained_loader_refuses_a_checkpoint_that_would_run_code(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(layouts.ConversionError, match="refused to load"):
        read_pretrained(path)
    assert not marker.exists()


def test_knn_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    from finetune import knn
    from tests.eval.test_knn_linprobe import make_folder

    path, marker = malicious_checkpoint(tmp_path)
    data = make_folder(tmp_path / "data", per_class=(1, 1))
    with pytest.raises(SystemExit) as e:
        knn.main([str(path), "--data_path", str(data), "--device", "cpu"])
    assert e.value.code == 2 and "refused to load" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_finetuning_refuses_a_checkpoint_that_would_run_code(tmp_path):
    from tests.eval.test_knn_linprobe import make_folder

    path, marker = malicious_checkpoint(tmp_path)
    data = make_folder(tmp_path / "data", per_class=(1, 1))
    result = subprocess.run([sys.executable, "-m", "finetune.main_finetune", "atto", str(path), "--data_path",
                             str(data), "--depths", "[1, 1, 1, 1]", "--dims", "[8, 16, 16, 16]", "--device", "cpu",
                             "--epochs", "1", "--batch_size", "2", "--effective_batch", "2",
                             "--num_workers", "0", "--output_dir", str(tmp_path / "ft")],
                            capture_output=True, text=True, cwd=REPO)
    assert not marker.exists()
    assert str(path) in result.stderr and "refused to load" in result.stderr
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_training_checkpoints_with_numpy_rng_state_are_read(tmp_path):
    import numpy as np

    _, src = encoder_file(tmp_path, "atto", (1, 1, 1, 1), (8, 16, 16, 16))
    path = tmp_path / "train.pth"
    torch.save({"model": torch.load(src, weights_only=True), "rng": {"numpy": np.random.get_state()},
                "config": {"size": "atto", "epochs": 2}}, path)
    assert set(read_weights(path)) == {"model", "rng", "config"}
    assert conversion_lib.load_weights(path).depths == (1, 1, 1, 1)


def test_reference_training_checkpoints_with_their_args_are_read_by_every_reader(tmp_path):
    # The reference release saves {'model', 'optimizer', 'epoch', 'scaler', 'args'}, args an
    # argparse.Namespace: the converter, fine-tuning's and kNN's readers and --init all take it.
    import argparse

    from finetune.model import load_backbone
    from tests.data.test_own_data import DEPTHS, DIMS, fcmae_checkpoint

    path = tmp_path / "checkpoint-799.pth"
    fcmae_checkpoint(path, reference=True)
    saved = torch.load(path, weights_only=False)
    saved.update(optimizer={"state": {}, "param_groups": []}, scaler={"scale": 65536.0})
    torch.save(saved, path)
    assert isinstance(read_weights(path)["args"], argparse.Namespace)
    assert read_pretrained(path)["epoch"] == 799
    assert tuple(load_backbone(str(path)).stem[0].weight.shape) == (DIMS[0], 3, 4, 4)
    with pytest.raises(SystemExit) as exit_info:
        cv.main([str(path), str(tmp_path / "timm.safetensors")])
    assert exit_info.value.code == 0
    assert conversion_lib.load_weights(tmp_path / "timm.safetensors").depths == tuple(DEPTHS)


# ---------------------------------------------------------------- 384 pixels
@pytest.mark.slow
def test_finetune_and_evaluate_at_384(tmp_path):
    from tests.eval.test_knn_linprobe import make_folder

    data = make_folder(tmp_path / "data", per_class=(2, 1))
    out = tmp_path / "ft"
    common = ["--data_path", str(data), "--depths", "[1, 1, 1, 1]", "--dims", "[8, 8, 8, 8]",
              "--input_size", "384", "--device", "cpu", "--amp", "off", "--num_workers", "0", "--batch_size", "3",
              "--effective_batch", "3", "--output_dir", str(out)]
    train = subprocess.run([sys.executable, "-m", "finetune.main_finetune", "atto", "none", *common, "--epochs", "1",
                            "--warmup_epochs", "0", "--model_ema", "false", "--aa", "none", "--reprob", "0",
                            "--mixup", "0", "--cutmix", "0"], capture_output=True, text=True, cwd=REPO)
    assert train.returncode == 0, train.stderr[-2000:]
    evaluate = subprocess.run([sys.executable, "-m", "finetune.main_finetune", "atto", *common, "--eval", "true",
                               "--resume", str(out / "checkpoint-last.pth")], capture_output=True, text=True, cwd=REPO)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    record = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert record["model_count"] == 3 and 0 <= record["model_acc1"] <= 100
    assert (record["input_size"], record["crop_pct"]) == (384, 0.875)
    assert "384" in (out / "config.yaml").read_text()

    # Without repeating --input_size (or --output_dir): the checkpoint's 384, the same loss, eval.jsonl beside it.
    size = common.index("--input_size")
    bare = common[:size] + common[size + 2:-2]  # the last two: --output_dir OUT
    again = subprocess.run([sys.executable, "-m", "finetune.main_finetune", "atto", *bare, "--eval", "true",
                            "--resume", str(out / "checkpoint-last.pth")], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "at 384x384, crop_pct 0.875" in again.stdout and f"results appended to {out / 'eval.jsonl'}" in again.stdout
    assert json.loads((out / "eval.jsonl").read_text().splitlines()[-1]) == record

    # The same weights as a .safetensors file given as CHECKPOINT: read as weights, the same evaluation.
    weights = tmp_path / "classifier.safetensors"
    write_weights(ckpt.load_checkpoint(out / "checkpoint-last.pth")["model"], weights)
    again = subprocess.run([sys.executable, "-m", "finetune.main_finetune", "atto", str(weights), *common[:-1],
                            str(tmp_path / "eval_st"), "--eval", "true", "--resume", "none"],
                           capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    other = json.loads((tmp_path / "eval_st" / "eval.jsonl").read_text().splitlines()[-1])
    assert other["model_count"] == 3 and other["model_acc1"] == record["model_acc1"]
    assert other["model_loss"] == pytest.approx(record["model_loss"], rel=1e-5)
