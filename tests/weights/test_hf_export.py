"""The Hugging Face export (fcmae.weights.hf) as a user meets it: the pooled features equal timm's, the folder
gets the permissions of the umask, and a killed export leaves nothing that the next conversion keeps.

tests/weights/test_eval_export.py checks the stage outputs and `last_hidden_state`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcmae.runtime import files
from fcmae.weights import conversion as conversion_lib
from finetune import convert as cv
from tests.helpers import randomize_, single_process_env

REPO = Path(__file__).resolve().parents[2]
DEPTHS, DIMS = (1, 1, 1, 1), (8, 16, 16, 16)


def convert(argv):
    with pytest.raises(SystemExit) as e:
        cv.main([str(a) for a in argv])
    return e.value.code


def weights_file(tmp_path, kind):
    """A random FCMAE encoder (no final norm) or a fine-tuned classifier (with timm's head.norm); its path."""
    if kind == "encoder":
        import sparse

        model = sparse.build_encoder("atto", depths=DEPTHS, dims=DIMS)
    else:
        model = conversion_lib.build_dense(DEPTHS, DIMS, conv_mlp=False, num_classes=4)
    path = tmp_path / f"{kind}.pth"
    torch.save(randomize_(model, 5).state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["encoder", "classifier"])
def test_hf_pooler_output_is_timms_pre_logits(tmp_path, kind):
    """ConvNextV2Model's `pooler_output` (its final LayerNorm of the pooled features) against timm's
    `forward_head(pre_logits=True)`: an encoder's norm is the identity a fresh timm head starts with, a
    classifier's is its own."""
    transformers = pytest.importorskip("transformers", reason="transformers (the optional 'hf' extra) not installed")
    src, out = weights_file(tmp_path, kind), tmp_path / "hf"
    assert convert([src, out, "--format", "hf", "--no-verify"]) == 0
    model = transformers.ConvNextV2Model.from_pretrained(out).eval()

    conversion = conversion_lib.load_weights(src)
    dense = conversion_lib.build_dense(DEPTHS, DIMS, conversion.conv_mlp, num_classes=4).eval()
    dense.load_state_dict(conversion.state_dict, strict=False)  # an encoder: timm's fresh head.norm (1, 0)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled = model(imgs).pooler_output
        expected = dense.forward_head(dense.forward_features(imgs), pre_logits=True)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_hf_export_folder_and_files_honour_the_umask(tmp_path, umask):
    src = weights_file(tmp_path, "encoder")
    old = os.umask(umask)
    try:
        assert convert([src, tmp_path / "hf", "--format", "hf", "--no-verify"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask, oct((tmp_path / "hf").stat().st_mode)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "hf" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


KILLED_EXPORT = """
import os, sys
from fcmae.weights import hf
hf.write_weights = lambda *args, **kwargs: os._exit(9)  # killed while the folder is being written
from finetune import convert
convert.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_killed_hf_export_leaves_a_temporary_that_the_next_conversion_removes(tmp_path):
    src, out = weights_file(tmp_path, "encoder"), tmp_path / "hf"
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(src), str(out), "--format", "hf",
                             "--no-verify"], cwd=REPO, env=single_process_env(PYTHONPATH=str(REPO)))
    assert killed.returncode == 9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
    assert len(left) == 1 and left[0].is_dir(), left
    running = files.temporary_folder(out)  # a live writer's (this process): kept
    assert convert([src, out, "--format", "hf", "--no-verify"]) == 0
    assert not left[0].exists(), "the killed export's temporary folder was kept"
    assert running.is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
