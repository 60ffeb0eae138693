"""The GPU check script on CPU (--quick, the speed preset's plan and budget), and the FLOP counts of its MFU column."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.convnext import ConvNeXt
from torch.utils.flop_counter import FlopCounterMode

from fcmae import build_fcmae
from fcmae.tools import gpu_bench, gpu_check, gpu_pretrain, gpu_rows
from fcmae.tools.flops import decoder_forward_flops, encoder_forward_flops, step_flops
from fcmae.tools.gpu_bench import MaskedImageDenseEncoder, bench_row, peak_bf16_flops
from fcmae.tools.gpu_check import parse_args
from fcmae.tools.gpu_pretrain import pretrain_compile, steady_state
from fcmae.tools.gpu_rows import QUICK_ARCHS, Budget, estimate_s, grid_rows, skip_reason, speed_rows

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
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert set(result) == {"device", "preset", "budget_s", "elapsed_s", "tests", "bench", "skipped", "pretrain",
                           "pretrain_compile", "data", "dwconv"}
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    assert result["preset"] is None and result["budget_s"] is None and result["skipped"] == []
    tests = result["tests"]
    assert set(tests) == {"passed", "failed", "skipped"} and all(isinstance(v, int) for v in tests.values())
    assert tests["failed"] == 0 and tests["skipped"] >= 5  # the cuda tests skip on CPU
    rows = result["bench"]
    assert sorted((r["size"], r["backend"], r["what"], r["mode"], r["batch"]) for r in rows) == sorted(
        ("quick", b, w, m, n) for b in ("torch", "dense-masked", "timm") for w in ("encoder", "step")
        for m in ("eager", "compiled") for n in (4, 8))
    for row in rows:
        assert "error" not in row, row
        assert set(row) == {"size", "batch", "backend", "mode", "what", "ms", "img_s", "peak_mib", "mfu", "compile_s",
                            "wall_s"}
        assert row["ms"] > 0 and row["img_s"] > 0 and row["peak_mib"] is None and row["mfu"] is None
        assert (row["compile_s"] is None) == (row["mode"] == "eager")
        assert row["wall_s"] + 0.01 >= (row["compile_s"] or 0)  # the row's time holds its compilation
    pretrain = result["pretrain"]
    assert set(pretrain) == {"size", "batch", "compile", "steps", "final_loss", "steady_img_s", "steady_steps",
                             "startup_s", "bench_img_s", "steady_vs_bench"}
    assert pretrain["steps"] == 6 and pretrain["steady_steps"] == 4 and pretrain["steady_img_s"] > 0
    assert pretrain["startup_s"] > 0 and 0 < pretrain["final_loss"] < 10
    assert result["pretrain_compile"] in ("true", "false") and pretrain["compile"] == result["pretrain_compile"]
    assert pretrain["steady_vs_bench"] > 0  # the bench ran the same mode at batch 8
    data = result["data"]
    assert set(data["img_s"]) == {"fcmae-cpu", "torchvision"} and min(data["img_s"].values()) > 0
    assert data["ratio"] > 0 and "error" not in data
    assert [(r["p"], r["channels"]) for r in result["dwconv"]] == [(8, 40), (4, 80), (2, 160), (1, 320)]  # atto
    for row in result["dwconv"]:
        assert row["conv:dense"] > 0 and row["wgrad:loop"] > 0 and len(row["fastest"]) == len(row["default"]) == 2
    assert "| quick | 4 | step | torch | compiled |" in (out / "gpu_check.md").read_text()
    assert '"type": "train"' in (out / "pretrain_log.jsonl").read_text()


@pytest.mark.slow
def test_quick_speed_preset_runs_its_rows_in_order_within_its_budget(tmp_path):
    """--preset speed on CPU with an 18 s budget: the rows that ran are the plan's, in its order; every other row is
    recorded with why it did not run (the budget, or cudagraphs without CUDA)."""
    out = tmp_path / "check"
    argv = ["--device", "cpu", "--quick", "--preset", "speed", "--budget-min", "0.3"]
    assert gpu_check.main([*argv, "--out", str(out)]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    planned = [spec.describe() for spec in speed_rows(parse_args(argv))]
    ran = [{k: r[k] for k in ("size", "batch", "backend", "mode", "what")} for r in result["bench"]]
    assert ran and ran == [row for row in planned if row in ran]  # in the plan's order
    assert len(ran) + len(result["skipped"]) >= len(planned)
    assert all(r["reason"].startswith(("time budget:", "cudagraphs needs a CUDA device")) for r in result["skipped"])
    assert all("error" not in r and r["ms"] > 0 for r in result["bench"])
    assert result["budget_s"] == 18 and result["elapsed_s"] > 0
    assert "| quick | 8 | step | torch | eager |" in (out / "gpu_check.md").read_text()


def test_speed_preset_orders_rows_by_value():
    args = parse_args(["--device", "cpu", "--preset", "speed"])
    assert args.parts == ["bench", "pretrain"] and args.budget_s == 420
    rows = [(s.arch.name, s.arch.batch, s.backend, s.mode, s.sweep is not None) for s in speed_rows(args)]
    assert rows[:7] == [("base", 128, b, m, False) for b in ("torch", "dense-masked", "timm")
                        for m in ("eager", "compiled")] + [("base", 128, "torch", "regional", False)]
    assert rows[7:11] == [("base", b, "torch", "compiled", True) for b in (64, 256, 512, 1024)]
    assert rows[11:13] == [("base", b, "torch", "cudagraphs", False) for b in (64, 128)]
    assert rows[13:] == [(size, batch, b, "compiled", False) for size, batch in (("tiny", 128), ("huge", 32))
                         for b in ("torch", "dense-masked")]
    assert all(s.what == "step" and s.arch.img_size == 224 for s in speed_rows(args))
    assert parse_args(["--device", "cpu", "--preset", "speed", "--budget-min", "0"]).budget_s is None
    assert parse_args(["--device", "cpu"]).budget_s is None


def test_quick_grid_has_two_batches_and_the_timm_backend():
    args = parse_args(["--device", "cpu", "--quick", "--what", "step"])
    rows = [(s.arch.name, s.arch.batch, s.backend, s.mode) for s in grid_rows(args, ["torch", "dense-masked", "timm"])]
    assert rows == [("quick", n, b, m) for n in (4, 8) for b in ("torch", "dense-masked", "timm")
                    for m in ("eager", "compiled")]
    args = parse_args(["--device", "cpu", "--sizes", "tiny,base", "--batch", "16", "--img-size", "96"])
    assert {(s.arch.name, s.arch.batch, s.arch.img_size) for s in grid_rows(args, ["torch"])} == {
        ("tiny", 16, 96), ("base", 16, 96)}


def fake_row(spec, ms=10.0, wall_s=5.0, compile_s=None, **extra):
    return {**spec.describe(), "ms": ms, "img_s": 1.0, "wall_s": wall_s, "compile_s": compile_s, **extra}


def test_budget_estimates_rows_from_those_that_ran():
    args = parse_args(["--device", "cpu", "--preset", "speed"])
    specs = speed_rows(args)
    eager, compiled, regional = specs[0], specs[1], specs[6]
    assert estimate_s(eager, []) == 0.0  # nothing known yet
    done = [fake_row(eager, wall_s=4.0), fake_row(compiled, wall_s=100.0, compile_s=90.0)]
    assert estimate_s(specs[2], done) == 4.0  # dense-masked eager: the last eager row
    assert estimate_s(regional, done) == 100.0  # a first regional row: the slowest compiled row so far
    sweep_512 = specs[9]  # base at 512: 90 s of compilation and 4x the steps of batch 128
    assert sweep_512.arch.batch == 512 and estimate_s(sweep_512, done) == 90.0 + 10.0 * 4
    budget = Budget(200.0)
    budget.start -= 150.0  # 50 s left
    assert skip_reason(specs[2], torch.device("cpu"), {}, budget, done) is None
    assert skip_reason(sweep_512, torch.device("cpu"), {}, budget, done).startswith(
        "time budget: about 130 s expected, 50 s left")


def test_sweep_stops_at_the_first_out_of_memory_row(tmp_path, monkeypatch):
    """Rows after an OOM in the sweep are recorded as not run; the rows after the sweep still run."""
    def bench(arch, backend, what, mode, *rest):
        row = {"size": arch.name, "batch": arch.batch, "backend": backend, "mode": mode, "what": what, "ms": 1.0,
               "img_s": 1.0, "peak_mib": None, "mfu": None, "compile_s": None}
        if mode == "compiled" and arch.batch == 256:
            row.update(ms=None, error="OutOfMemoryError: CUDA out of memory", oom=True)
        return row

    monkeypatch.setattr(gpu_rows, "bench_row", bench)
    args = parse_args(["--device", "cpu", "--preset", "speed", "--out", str(tmp_path)])
    report = gpu_check.Report(tmp_path, torch.device("cpu"), args)
    gpu_rows.run_rows(speed_rows(args), args, torch.device("cpu"), report, Budget(None))
    skipped = [(r["batch"], r["mode"], r["reason"]) for r in report.data["skipped"]]
    assert skipped == [(512, "compiled", "the sweep ran out of memory at batch 256"),
                       (1024, "compiled", "the sweep ran out of memory at batch 256"),
                       (64, "cudagraphs", "cudagraphs needs a CUDA device, not cpu"),
                       (128, "cudagraphs", "cudagraphs needs a CUDA device, not cpu")]
    assert [r["size"] for r in report.data["bench"]][-4:] == ["tiny", "tiny", "huge", "huge"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["skipped"] == report.data["skipped"] and len(saved["bench"]) == 13
    assert "- base 512 step torch compiled: the sweep ran out of memory at batch 256" in \
        (tmp_path / "gpu_check.md").read_text()


def test_bench_row_records_errors_and_out_of_memory(monkeypatch):
    arch = QUICK_ARCHS["base"]
    row = bench_row(arch, "torch", "step", "cudagraphs", torch.device("cpu"), 1, 1, "inductor")
    assert row["error"].startswith("ConfigError: compile_mode cudagraphs captures CUDA graphs") and "oom" not in row

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_bench, "build_case", out_of_memory)
    row = bench_row(arch, "torch", "step", "compiled", torch.device("cpu"), 1, 1, "aot_eager")
    assert row["oom"] is True and row["error"].startswith("OutOfMemoryError: CUDA out of memory")
    with pytest.raises(ValueError, match="mode 'fast' is not one of eager, compiled, regional, cudagraphs"):
        bench_row(arch, "torch", "step", "fast", torch.device("cpu"), 1, 1)


def test_eager_bench_row_has_no_compile_time():
    row = bench_row(dataclasses.replace(QUICK_ARCHS["tiny"], batch=2), "torch", "step", "eager",
                    torch.device("cpu"), 1, 2)
    assert "error" not in row and row["mode"] == "eager" and row["compile_s"] is None and row["ms"] > 0


def bench_rows(compiled_ms, eager_ms, size="base", regional_ms=None):
    rows = [{"size": size, "what": "step", "backend": "torch", "mode": "compiled", "ms": compiled_ms},
            {"size": size, "what": "step", "backend": "torch", "mode": "eager", "ms": eager_ms},
            {"size": size, "what": "step", "backend": "timm", "mode": "compiled", "ms": 0.1},
            {"size": size, "what": "step", "backend": "torch", "mode": "cudagraphs", "ms": 0.1}]
    return rows + ([{"size": size, "what": "step", "backend": "torch", "mode": "regional", "ms": regional_ms}]
                   if regional_ms else [])


@pytest.mark.parametrize("flag,rows,expected", [
    ("best", bench_rows(80.0, 100.0), "true"), ("best", bench_rows(120.0, 100.0), "false"),
    ("best", bench_rows(80.0, 100.0, regional_ms=70.0), "regional"),
    ("best", bench_rows(80.0, 100.0, "huge"), "true"),  # no base rows: another size decides
    ("best", bench_rows(None, 100.0), "auto"), ("best", [], "auto"), ("false", bench_rows(80.0, 100.0), "false"),
    ("cudagraphs", [], "cudagraphs")])
def test_pretrain_compile_follows_the_bench(flag, rows, expected):
    """best: the fastest of eager, compiled and regional (cudagraphs, never run in training, only by name)."""
    args = parse_args(["--device", "cpu", "--pretrain-compile", flag])
    assert pretrain_compile(args, rows) == expected


def test_steady_state_from_the_log():
    """Images/s between the first record at or after the warm-up and the last; start-up to the end of step 1."""
    launched = 1000.0
    records = [{"type": "train", "step": step, "loss": 1.0 / step, "time": launched + 30.0 + 0.5 * step}
               for step in range(10, 250, 10)] + [{"type": "epoch", "epoch": 1}]
    result = steady_state(records, batch=128, warmup_steps=40, launched=launched)
    assert result["steady_steps"] == 200 and result["steps"] == 240
    assert result["steady_img_s"] == pytest.approx(128 / 0.5)
    assert result["startup_s"] == pytest.approx(30.5)  # the record of step 10 less its 9 other steps
    assert result["final_loss"] == pytest.approx(1 / 240, abs=1e-5)
    assert steady_state(records[:3], 128, 40, launched)["steady_img_s"] is None  # no timed window yet


def test_pretrain_runs_the_launcher_on_this_python(tmp_path, monkeypatch):
    """The launcher's subprocess gets PYTHON=sys.executable (a GPU machine may have only `python3`); one epoch
    of hard-linked JPEGs, no checkpoint before the end."""
    calls = []

    def fake_run(cmd, **kwargs):
        data = Path(cmd[cmd.index("--data_path") + 1]) / "train" / "synthetic"
        files = sorted(data.iterdir())
        calls.append((cmd, kwargs["env"], len(files), len({f.stat().st_ino for f in files})))
        return subprocess.CompletedProcess(cmd, 0, stdout="")

    monkeypatch.setattr(gpu_pretrain.subprocess, "run", fake_run)
    args = parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    result = gpu_pretrain.run_pretrain(args, torch.device("cpu"), tmp_path, "regional", [])
    (cmd, env, files, distinct), = calls
    assert env["PYTHON"] == sys.executable and env["NPROC_PER_NODE"] == "1"
    assert "--compile=true" in cmd and cmd[cmd.index("--compile_mode") + 1] == "regional"
    assert cmd[cmd.index("--compile_backend") + 1] == "aot_eager"
    flags = ("--epochs", "--save_every", "--save_minutes", "--batch_size")
    assert [cmd[cmd.index(flag) + 1] for flag in flags] == ["1", "0", "null", "8"]
    assert (files, distinct) == (6 * 8, 8)  # steps x batch files, 8 of them written
    assert result["steady_img_s"] is None and result["steps"] == 0


@pytest.mark.slow
def test_bad_flags_are_one_line_errors(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--device", "cpu", "--parts", "tests,foo",
                           "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 2 and "--parts: foo; choose from tests, bench, pretrain, data, dwconv" in proc.stdout
    assert "Traceback" not in proc.stdout
