"""The GPU check script on CPU (--quick), and the analytic FLOP counts behind its MFU column."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.convnext import ConvNeXt
from torch.utils.flop_counter import FlopCounterMode

from fcmae import build_fcmae
from fcmae.tools import gpu_check
from fcmae.tools.flops import decoder_forward_flops, encoder_forward_flops, step_flops
from fcmae.tools.gpu_bench import MaskedImageDenseEncoder, peak_bf16_flops
from fcmae.tools.gpu_check import parse_args, pretrain_compile

REPO = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("in_chans", [3, 1])
def test_decoder_and_step_flops_match_the_flop_counter(in_chans):
    """FCMAE on the dense encoder sees every site: its counted forward is encoder + decoder."""
    depths, dims = (1, 1, 1, 1), (8, 16, 24, 32)
    model = build_fcmae("atto", img_size=64, decoder_dim=16, depths=depths, dims=dims, in_chans=in_chans)
    decoder_only = counted_flops(lambda: model.forward_decoder(torch.randn(2, 32, 2, 2), torch.ones(2, 4)))
    assert decoder_forward_flops(32, 16, 1, sites=2 * 4, in_chans=in_chans) == decoder_only
    dense = ConvNeXt(in_chans=in_chans, depths=depths, dims=dims, ls_init_value=None, use_grn=True, num_classes=0)
    encoder_only = counted_flops(lambda: dense.forward_features(torch.randn(2, in_chans, 64, 64)))
    assert step_flops(depths, dims, batch=2, num_patches=4, kept=4, decoder_dim=16, decoder_depth=1,
                      in_chans=in_chans) == 3 * (encoder_only + decoder_only)


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


@pytest.mark.slow
def test_quick_cpu_run_writes_every_key(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--backends", "torch,dense-masked,timm", "--parts", "tests,bench,pretrain,data,dwconv",
                           "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert set(result) == {"device", "tests", "bench", "pretrain", "pretrain_compile", "data", "dwconv"}
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
    assert result["pretrain_compile"] in ("true", "false")  # chosen from the bench's torch step rows
    data = result["data"]
    assert set(data["img_s"]) == {"fcmae-cpu", "torchvision"} and min(data["img_s"].values()) > 0
    assert data["ratio"] > 0 and "error" not in data
    assert [(r["p"], r["channels"]) for r in result["dwconv"]] == [(8, 40), (4, 80), (2, 160), (1, 320)]  # atto
    for row in result["dwconv"]:
        assert row["conv:dense"] > 0 and row["wgrad:loop"] > 0 and len(row["fastest"]) == len(row["default"]) == 2
    assert "| quick | 4 | step | torch | yes |" in (out / "gpu_check.md").read_text()
    assert '"type": "train"' in (out / "pretrain_log.jsonl").read_text()


def bench_rows(compiled_ms, eager_ms, size="base"):
    return [{"size": size, "what": "step", "backend": "torch", "compiled": True, "ms": compiled_ms},
            {"size": size, "what": "step", "backend": "torch", "compiled": False, "ms": eager_ms},
            {"size": size, "what": "step", "backend": "timm", "compiled": True, "ms": 0.1}]


@pytest.mark.parametrize("flag,rows,expected", [
    ("best", bench_rows(80.0, 100.0), "true"), ("best", bench_rows(120.0, 100.0), "false"),
    ("best", bench_rows(80.0, 100.0, "huge"), "true"),  # no base rows: another size decides
    ("best", bench_rows(None, 100.0), "auto"), ("best", [], "auto"), ("false", bench_rows(80.0, 100.0), "false")])
def test_pretrain_compile_follows_the_bench(flag, rows, expected):
    args = parse_args(["--device", "cpu", "--pretrain-compile", flag])
    assert pretrain_compile(args, rows) == expected


def test_pretrain_runs_the_launcher_on_this_python(tmp_path, monkeypatch):
    """The launcher's subprocess gets PYTHON=sys.executable (a GPU machine may have only `python3`)."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]))
        return subprocess.CompletedProcess(cmd, 0, stdout="")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    args = parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    gpu_check.run_pretrain(args, torch.device("cpu"), tmp_path, "true")
    (cmd, env), = calls
    assert env["PYTHON"] == sys.executable and env["NPROC_PER_NODE"] == "1"
    assert "--compile=true" in cmd and cmd[cmd.index("--compile_backend") + 1] == "aot_eager"


@pytest.mark.slow
def test_bad_flags_are_one_line_errors(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--device", "cpu", "--parts", "tests,foo",
                           "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 2 and "--parts: foo; choose from tests, bench, pretrain, data, dwconv" in proc.stdout
    assert "Traceback" not in proc.stdout
