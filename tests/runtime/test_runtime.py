"""The shared runtime: the plan at scale, typed frozen configs, weights_only checkpoints, atomic writes."""

import dataclasses
import os

import pytest
import torch

from fcmae.pretrain.main import resolve_config as pretrain_config
from fcmae.runtime import checkpoint as ckpt
from fcmae.runtime.errors import ConfigError, PlanError
from fcmae.runtime.files import write_atomic
from fcmae.runtime.plan import make_plan
from finetune.config import resolve_config as finetune_config

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


# ---------------------------------------------------------------- the effective batch at scale
def test_atto_800ep_on_64_gpus_plans_the_recipe():
    plan = make_plan(pretrain_config(["atto", "800ep", "--data_path", "/d"]), 64)
    assert (plan.batch_size, plan.update_freq, plan.effective_batch) == (64, 1, 4096)
    assert plan.lr == pytest.approx(2.4e-3)
    assert any("lowered from batch_size 256 to 64" in note for note in plan.notes)


def test_finetune_tiny_on_32_gpus_plans_the_recipe():
    plan = make_plan(finetune_config(["tiny", "none", "--data_path", "/d"]), 32)
    assert (plan.batch_size, plan.update_freq, plan.effective_batch) == (32, 1, 1024)
    assert plan.lr == pytest.approx(8e-4 * 1024 / 256) and plan.notes


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_effective_batch_is_the_recipe_on_1_to_256_gpus_or_a_clear_error(command):
    for size in SIZES:
        cfg = (pretrain_config([size, "800ep", "--data_path", "/d"]) if command == "pretrain"
               else finetune_config([size, "none", "--data_path", "/d"]))
        for world in range(1, 257):
            if cfg.effective_batch % world:
                with pytest.raises(PlanError, match="--effective_batch to a multiple of"):
                    make_plan(cfg, world)
                continue
            plan = make_plan(cfg, world)
            assert plan.effective_batch == cfg.effective_batch, (size, world)
            assert plan.batch_size <= cfg.batch_size and plan.batch_size * world * plan.update_freq == \
                cfg.effective_batch
            assert plan.lr == pytest.approx(cfg.blr * cfg.effective_batch / 256)
            assert bool(plan.notes) == (plan.batch_size != cfg.batch_size)


def test_an_explicit_update_freq_is_kept_and_the_plan_says_so():
    cfg = pretrain_config(["base", "1600ep", "--data_path", "/d", "--batch_size", "64", "--update_freq", "2"])
    plan = make_plan(cfg, 8)
    assert (plan.effective_batch, plan.update_freq) == (1024, 2)
    assert "differs from the target 4096" in plan.notes[0]


# ---------------------------------------------------------------- typed configs
def test_configs_are_typed_and_frozen():
    cfg = pretrain_config(["atto", "demo", "--amp", "false", "--output_dir", "2024", "--lr", "1e-3"])
    assert cfg.amp == "off" and cfg.output_dir == "2024" and cfg.lr == 1e-3 and cfg.update_freq is None
    assert isinstance(cfg.betas, tuple) and isinstance(cfg.to_dict()["betas"], list)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3
    assert cfg.replace(batch_size=3).batch_size == 3 and cfg.batch_size == 32
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        pretrain_config(["atto", "demo", "--batch_size", "0"])
    with pytest.raises(ConfigError, match="warmup_epochs"):
        cfg.replace(warmup_epochs=100)
    ft = finetune_config(["atto", "none", "--demo", "--use_amp", "false"])
    assert ft.amp == "off" and ft.finetune is None
    with pytest.raises(ConfigError, match="layer_decay must be a number in"):
        finetune_config(["atto", "none", "--demo", "--layer_decay", "2"])


def test_reference_release_settings_are_config_keys():
    cfg = pretrain_config(["atto", "demo", "--init_std", "1.0", "--decay_grn_and_mask_token", "true"])
    assert cfg.init_std == 1.0 and cfg.decay_grn_and_mask_token
    default = pretrain_config(["atto", "demo"])
    assert default.init_std == 0.02 and not default.decay_grn_and_mask_token and default.amp == "bf16"


def test_reference_weight_decay_and_init():
    from fcmae import build_fcmae
    from fcmae.pretrain.optim import param_groups

    model = build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=16)
    names = {id(p): n for n, p in model.named_parameters()}
    for reference in (False, True):
        no_decay, decay = param_groups(model, 0.05, reference)
        decayed = {names[id(p)] for p in decay["params"]}
        special = {n for n in names.values() if n.endswith(("grn.weight", "grn.bias")) or n == "mask_token"}
        assert (special <= decayed) == reference and not (special & decayed) == reference
        assert "encoder.stem.0.weight" in decayed and "encoder.stem.0.bias" not in decayed
    torch.manual_seed(0)
    wide = build_fcmae("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=16, init_std=1.0)
    for name in ("encoder.stem.0.weight", "encoder.stages.0.blocks.0.conv_dw.weight", "proj.weight", "pred.weight",
                 "encoder.stages.1.blocks.0.mlp.fc1.weight"):
        assert 0.7 < float(wide.state_dict()[name].std()) < 1.0, name  # trunc_normal_ at +-2: std ~0.88
    assert float(wide.state_dict()["encoder.stages.1.downsample.1.weight"].std()) < 0.05


# ---------------------------------------------------------------- checkpoints and files
def test_checkpoints_load_with_weights_only(tmp_path):
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(1)
    state = ckpt.rng_state()
    cfg = pretrain_config(["atto", "demo"])
    ckpt.save_atomic({"model": {"w": torch.ones(2)}, "rng": [state], "config": cfg.to_dict(), "step": 3},
                     tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert loaded["config"] == cfg.to_dict() and loaded["step"] == 3
    expected = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.set_rng_state(loaded["rng"][0])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.txt"
    write_atomic(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.txt"]


# ---------------------------------------------------------------- structure
def test_the_runtime_imports_no_command_and_finetune_not_the_pretraining_command():
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    commands = {"fcmae.pretrain.main", "fcmae.pretrain.config", "finetune", "finetune.main_finetune"}
    for pattern, banned in (("fcmae/runtime/*.py", commands), ("finetune/*.py", {"fcmae.pretrain.main"})):
        for path in repo.glob(pattern):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = {node.module or ""}
                elif isinstance(node, ast.Import):
                    names = {a.name for a in node.names}
                else:
                    continue
                assert not {n for n in names if n in banned or n.split(".")[0] in banned}, (path, names)


@pytest.mark.slow
def test_importing_the_commands_needs_no_torch_amp_gradscaler():
    """torch < 2.3 has no torch.amp.GradScaler: no annotation or default may evaluate it at import time."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch.amp; del torch.amp.GradScaler; "
            "import fcmae.runtime.trainer, fcmae.pretrain.main, finetune.main_finetune")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command,positional", [(pretrain_config, ["atto", "demo"]),
                                                (finetune_config, ["atto", "none", "--demo"])])
def test_yaml_exponents_without_a_dot_are_numbers(tmp_path, command, positional):
    """YAML 1.1 reads `1e-4` as a string; a --config file's floats and float lists must still be numbers."""
    config = tmp_path / "mine.yaml"
    config.write_text("blr: 1e-4\nmin_lr: 1e-6\nweight_decay: 5e-2\n")
    cfg = command([*positional, "--config", str(config)])
    assert (cfg.blr, cfg.min_lr, cfg.weight_decay) == (1e-4, 1e-6, 5e-2)
    config.write_text("blr: fast\n")
    with pytest.raises(ConfigError, match="blr must be a number"):
        command([*positional, "--config", str(config)])
