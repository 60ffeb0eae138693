"""The GPU check script on CPU (--quick), and the analytic FLOP counts behind its MFU column."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from timm.models.convnext import ConvNeXt
from torch.utils.flop_counter import FlopCounterMode

from fcmae import build_fcmae
from fcmae.flops import decoder_forward_flops, encoder_forward_flops, step_flops
from fcmae.gpu_bench import MaskedImageDenseEncoder, peak_bf16_flops

REPO = Path(__file__).resolve().parents[1]


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("depths,dims,img", [((1, 2, 1, 1), (8, 16, 24, 32), 64), ((2, 1, 3, 1), (16, 8, 32, 24), 96)])
def test_encoder_flops_match_the_flop_counter_on_the_dense_model(depths, dims, img):
    dense = ConvNeXt(depths=depths, dims=dims, ls_init_value=None, use_grn=True, num_classes=0)
    imgs = torch.randn(2, 3, img, img)
    counted = counted_flops(lambda: dense.forward_features(imgs))
    assert encoder_forward_flops(depths, dims, kept_patches=2 * (img // 32) ** 2) == counted


def test_decoder_and_step_flops_match_the_flop_counter():
    """FCMAE on the dense encoder sees every site: its counted forward is encoder + decoder."""
    depths, dims = (1, 1, 1, 1), (8, 16, 24, 32)
    model = build_fcmae("atto", img_size=64, decoder_dim=16, depths=depths, dims=dims)
    decoder_only = counted_flops(lambda: model.forward_decoder(torch.randn(2, 32, 2, 2), torch.ones(2, 4)))
    assert decoder_forward_flops(32, 16, 1, sites=2 * 4) == decoder_only
    forward = encoder_forward_flops(depths, dims, 2 * 4) + decoder_only
    assert step_flops(depths, dims, batch=2, num_patches=4, kept=4, decoder_dim=16, decoder_depth=1) == 3 * forward


def test_masked_image_dense_encoder_zeroes_masked_pixels():
    class Arch:
        depths, dims = (1, 1, 1, 1), (8, 16, 24, 32)

    encoder = MaskedImageDenseEncoder(Arch).eval()
    imgs = torch.randn(1, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    edited = imgs.clone()
    edited[:, :, :32, :32] = 7.0  # only the masked patch changes
    with torch.no_grad():
        assert torch.equal(encoder(imgs, mask), encoder(edited, mask))
        assert not torch.equal(encoder(imgs), encoder(edited))


def test_peak_rate_is_unknown_on_cpu():
    assert peak_bf16_flops(torch.device("cpu")) is None


def test_quick_cpu_run_writes_every_key(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--backends", "torch,dense-masked,timm", "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert set(result) == {"device", "tests", "bench", "pretrain"}
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    tests = result["tests"]
    assert set(tests) == {"passed", "failed", "skipped"} and all(isinstance(v, int) for v in tests.values())
    assert tests["failed"] == 0 and tests["skipped"] >= 5  # the cuda tests skip on CPU
    rows = result["bench"]
    assert {(r["backend"], r["what"], r["compiled"]) for r in rows} == {
        (b, w, c) for b in ("torch", "dense-masked", "timm") for w in ("encoder", "step") for c in (False, True)}
    for row in rows:
        assert "error" not in row, row
        assert set(row) == {"size", "batch", "backend", "compiled", "what", "ms", "img_s", "peak_mib", "mfu"}
        assert row["ms"] > 0 and row["img_s"] > 0 and row["peak_mib"] is None and row["mfu"] is None
    pretrain = result["pretrain"]
    assert set(pretrain) == {"steps", "img_s", "final_loss"}
    assert pretrain["steps"] == 6 and pretrain["img_s"] > 0 and 0 < pretrain["final_loss"] < 10
    assert "| quick | 4 | step | torch | yes |" in (out / "gpu_check.md").read_text()
    assert '"type": "train"' in (out / "pretrain_log.jsonl").read_text()


def test_bad_flags_are_one_line_errors(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--device", "cpu", "--parts", "tests,foo",
                           "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 2 and "--parts: foo; choose from tests, bench, pretrain" in proc.stdout
    assert "Traceback" not in proc.stdout
