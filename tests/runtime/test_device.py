"""Device settings (fcmae/runtime/device.py) on CPU: CUDA defaults, fused AdamW, `--compile` through the command.

What needs a GPU (AdamW fused on CUDA parameters, compiled CUDA steps) is in
tests/runtime/test_cuda.py and the GPU check's bench.
"""

import copy
import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fcmae import build_fcmae
from fcmae.pretrain import main as main_pretrain
from fcmae.pretrain.optim import build_optimizer, param_groups
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.device import (
    CACHE_VARIABLE,
    adamw_fused,
    check_compile_mode,
    compile_cache_dir,
    compile_model,
    configure_device,
    run_process,
    use_compile,
)
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.errors import ConfigError
from fcmae.runtime.logs import read_jsonl
from fcmae.runtime.plan import LoopSettings
from fcmae.runtime.trainer import Trainer
from tests.helpers import TINY_ARGS, assert_close, tiny_args


def cuda_flags():
    return (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


@pytest.fixture
def restore_flags():
    """The process-wide flags as they were before the test."""
    before = cuda_flags()
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before[1:]


def test_configure_device_changes_nothing_on_cpu(restore_flags):
    before = cuda_flags()
    configure_device(torch.device("cpu"), tf32=True)
    assert cuda_flags() == before


@pytest.mark.parametrize("tf32,expected", [(True, ("high", True, True)), (False, ("highest", False, True))])
def test_configure_device_sets_the_cuda_defaults(restore_flags, tf32, expected):
    """The flags are process-wide and settable without a GPU; only their effect needs one."""
    torch.set_float32_matmul_precision("highest" if tf32 else "high")
    torch.backends.cudnn.benchmark = False
    configure_device(torch.device("cuda"), tf32=tf32)
    assert cuda_flags() == expected
    assert torch.backends.cuda.matmul.allow_tf32 == tf32


def test_adamw_is_fused_on_one_cpu_or_cuda_device():
    model = build_fcmae("atto", img_size=64, decoder_dim=16, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    assert adamw_fused(model)
    assert all(group["fused"] is True for group in build_optimizer(model, 1e-3, 0.05).param_groups)
    assert not adamw_fused(torch.nn.Module())  # no parameters
    assert not adamw_fused(torch.nn.Linear(2, 2, device="meta"))  # no fused kernel there
    model.proj.to("meta")
    assert not adamw_fused(model)  # parameters on two devices


def test_fused_cpu_adamw_takes_the_for_loop_adamw_step():
    torch.manual_seed(0)
    model = build_fcmae("atto", img_size=64, decoder_dim=16, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    twin = copy.deepcopy(model)
    fused = build_optimizer(model, 1e-3, 0.05)
    loop = torch.optim.AdamW(param_groups(twin, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=False, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(param) for param in model.parameters()]
        for params in (model.parameters(), twin.parameters()):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
        fused.step()
        loop.step()
    for got, expected in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_compile_auto_means_cuda_only():
    assert use_compile(None, torch.device("cuda")) and not use_compile(None, torch.device("cpu"))
    assert use_compile(True, torch.device("cpu")) and not use_compile(False, torch.device("cuda"))


@pytest.mark.parametrize("built,saved", [(False, True), (True, False)])
def test_resume_keeps_this_runs_adamw_implementation(tmp_path, built, saved):
    """A checkpoint's `fused` flag must not replace this run's: a fused CUDA AdamW's checkpoint resumed on a
    device without it, or a for-loop AdamW's checkpoint (CPU before fused CPU AdamW) resumed fused."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=built)
    model(torch.randn(4, 3)).sum().backward()
    earlier = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    earlier.step()  # a state to restore
    saved_state = earlier.state_dict()
    saved_state["param_groups"][0]["fused"] = saved
    settings = LoopSettings(1, 1, 1, 1e-3, 0.0, 0, 1, 1, "off", 1, 0, 0)
    trainer = Trainer(model, optimizer, lambda m, b: m(b).sum(), settings, DistInfo(), tmp_path, tmp_path / "tb", {})
    trainer.restore({"model": model.state_dict(), "optimizer": saved_state, "run_state": {}, "rng": []}, "ckpt", 0)
    assert optimizer.param_groups[0]["fused"] is built
    assert int(optimizer.state[model.weight]["step"]) == 1
    optimizer.step()  # the restored state works with this implementation
    assert int(optimizer.state[model.weight]["step"]) == 2


# The shared tiny run for one epoch at a high learning rate, checkpoints as the command saves them.
pretrain_args = partial(tiny_args, epochs=1, warmup_epochs=0, blr=0.05, vis_images=0, save_every=None,
                        keep_checkpoints=None)


@pytest.mark.slow
def test_compiled_pretraining_matches_eager_and_saves_plain_names(image_dir, tmp_path):
    """`--compile` through the real command: the same losses and weights as eager, checkpoints without `_orig_mod.`.

    aot_eager runs dynamo and AOTAutograd (the compiled forward and backward)
    without inductor's code generation, which takes minutes on a small CPU.
    """
    runs = {}
    for mode, flags in {"false": ["--compile", "false"], "true": ["--compile", "true"],
                        "regional": ["--compile", "true", "--compile_mode", "regional"]}.items():
        out = tmp_path / mode
        args = pretrain_args(image_dir, out, *flags, "--compile_backend", "aot_eager")
        assert main_pretrain.run(main_pretrain.resolve_config(args)) == 0
        losses = [r["loss"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
        runs[mode] = losses, ckpt.load_checkpoint(out / "checkpoint-last.pth")["model"]
    eager_losses, eager_weights = runs.pop("false")
    assert len(eager_losses) == 6 and eager_losses[0] != eager_losses[-1]  # the weights moved
    for compiled_losses, compiled_weights in runs.values():
        assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rel=1e-4)
        assert list(compiled_weights) == list(eager_weights)  # plain names, no `_orig_mod.` prefix
        for name, weight in eager_weights.items():
            assert_close(compiled_weights[name], weight, rel=1e-3)


@pytest.mark.parametrize("flags,expected", [([], None), (["--compile"], True), (["--compile", "false"], False),
                                            (["--compile=auto"], None)])
def test_compile_setting_words(tmp_path, flags, expected):
    cfg = main_pretrain.resolve_config(["atto", "demo", "--demo_data", "--output_dir", str(tmp_path), *flags])
    assert cfg.compile is expected and cfg.compile_backend == "inductor" and cfg.tf32 is True


def test_compile_modes_refuse_what_cannot_run():
    model = build_fcmae("atto", img_size=64, decoder_dim=16, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    with pytest.raises(ConfigError, match="compile_mode cudagraphs captures CUDA graphs and needs a CUDA device, "
                                          "not cpu; use whole or regional there"):
        compile_model(model, "inductor", "cudagraphs")
    with pytest.raises(ConfigError, match="compile_mode 'fast' is not one of: whole, regional, cudagraphs"):
        compile_model(model, "aot_eager", "fast")
    with pytest.raises(ConfigError, match="compile_mode regional: Linear has no ConvNeXt blocks to compile"):
        compile_model(torch.nn.Linear(2, 2), "aot_eager", "regional")
    with pytest.raises(ConfigError, match="cudagraphs is inductor's reduce-overhead mode; compile_backend must be "
                                          "inductor, not aot_eager"):
        check_compile_mode("cudagraphs", torch.device("cuda"), "aot_eager")
    check_compile_mode("cudagraphs", torch.device("cuda"), "inductor")  # what a GPU run may use


def test_cudagraphs_on_cpu_is_a_one_line_error(image_dir, tmp_path, capsys):
    args = pretrain_args(image_dir, tmp_path / "out", "--compile", "true", "--compile_mode", "cudagraphs")
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "compile_mode cudagraphs captures CUDA graphs and needs a CUDA device" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("compile_on,backend,preset,expected", [
    (True, "inductor", None, "out/compile_cache"), (True, "aot_eager", None, None), (False, "inductor", None, None),
    (None, "inductor", None, None),  # auto: eager on CPU
    (True, "inductor", "/shared/cache", None)])  # the user's own cache wins
def test_compile_cache_lives_in_the_output_folder(tmp_path, monkeypatch, compile_on, backend, preset, expected):
    """A requeued or resumed run (same output folder) finds inductor's compiled graphs; set only while the run runs."""
    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    if preset:
        monkeypatch.setenv(CACHE_VARIABLE, preset)
    cfg = SimpleNamespace(compile=compile_on, compile_backend=backend, output_dir=str(tmp_path / "out"), device="cpu",
                          tf32=True, cpu_threads=None)
    cache = compile_cache_dir(cfg, torch.device("cpu"))
    assert cache == (None if expected is None else tmp_path / expected)
    with run_process(cfg):
        assert os.environ.get(CACHE_VARIABLE) == (preset or (str(cache) if cache else None))
    assert os.environ.get(CACHE_VARIABLE) == preset


def test_unknown_compile_backend_is_a_one_line_error(image_dir, tmp_path, capsys):
    args = pretrain_args(image_dir, tmp_path / "out", "--compile", "true", "--compile_backend", "nosuch")
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "compile_backend 'nosuch' is not a torch.compile backend" in err and "Traceback" not in err
    assert not Path(tmp_path / "out" / "checkpoint-last.pth").exists()


@pytest.mark.slow
def test_compiled_finetuning_matches_eager_and_saves_plain_names(tmp_path, demo_cache):
    """The same through the fine-tuning command (drop path on: the compiled graph draws the same randomness)."""
    from finetune import main_finetune

    runs = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        args = ["atto", "none", *TINY_ARGS, "--device", "cpu", "--amp", "off", "--num_workers", "0", "--demo",
                "--input_size", "32", "--demo_crop_size", "64", "--demo_train_per_photo", "2",
                "--demo_val_per_photo", "1", "--batch_size", "8", "--effective_batch", "8", "--print_every", "1",
                "--epochs", "1", "--warmup_epochs", "0", "--blr", "0.01", "--drop_path", "0.2", "--model_ema", "true",
                "--output_dir", str(out), "--compile", mode, "--compile_backend", "aot_eager"]
        assert main_finetune.run(main_finetune.resolve_config(args)) == 0
        losses = [r["loss"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
        saved = ckpt.load_checkpoint(out / "checkpoint-last.pth")
        runs[mode] = losses, saved["model"], saved["ema"]
    (eager_losses, eager_weights, eager_ema), (compiled_losses, compiled_weights, compiled_ema) = runs.values()
    assert len(eager_losses) == 4
    assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rel=1e-4)
    assert list(compiled_weights) == list(eager_weights) and list(compiled_ema) == list(eager_ema)
    for name, weight in eager_weights.items():
        assert_close(compiled_weights[name], weight, rel=1e-3)


def test_device_settings_are_harmless_on_resume():
    """Compiling, its backend and TF32 may change between a checkpoint and its resume (also from a checkpoint
    written before these settings existed)."""
    from fcmae.runtime.resume import HARMLESS, meaningful_changes

    current = {"blr": 1e-3, "compile": True, "compile_backend": "aot_eager", "compile_mode": "regional", "tf32": False}
    assert meaningful_changes({"blr": 1e-3}, current, HARMLESS)[0] == []
    assert meaningful_changes({"blr": 2e-3}, current, HARMLESS)[0] == ["blr 0.002 -> 0.001"]
