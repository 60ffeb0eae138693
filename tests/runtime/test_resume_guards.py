"""What a resume refuses: a checkpoint whose unpickling would run code (wherever the resume finds it), and any
changed setting but the few whose change is harmless (the list is fixed here, so that a setting that changes
the meaning of a run cannot slip into it unnoticed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import resume
from fcmae.runtime.errors import ConfigChangeError
from finetune import main_finetune
from tests.helpers import TINY_ARGS, tiny_args, write_images

# The settings whose change a resume takes as given: the runtime's (fcmae.runtime.resume.HARMLESS) and each
# command's own (SPEC.harmless). Adding one is a decision about what a resumed run means: change it here too.
RUNTIME_HARMLESS = {"output_dir", "log_dir", "resume", "dry_run", "world_size", "exit_after_steps", "num_workers",
                    "print_every", "save_every", "keep_checkpoints", "device", "amp", "data_path", "cpu_threads",
                    "allow_config_change", "compile", "compile_backend", "compile_mode", "tf32", "save_minutes",
                    "max_restarts", "hang_minutes"}
COMMAND_HARMLESS = {
    "pretrain": {"vis_images", "backend", "max_bad_fraction", "init_std", "init", "decode", "batch_fit"},
    "finetune": {"finetune", "recipe_source", "head_init_scale", "model_ema_eval", "eval", "max_bad_fraction"},
}
COMMANDS = {"pretrain": main_pretrain, "finetune": main_finetune}
MEANINGFUL = {"pretrain": {"norm_pix_loss", "mask_ratio", "blr", "seed"}, "finetune": {"smoothing", "mixup", "blr"}}


class RunsCode:
    """Unpickled, it would create the folder `marker` (what a malicious checkpoint could do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("where", ["checkpoint-last.pth", "checkpoint-0001.pth", "--resume"])
def test_a_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys, where):
    """Auto-resume finds it as checkpoint-last.pth, or as the newest numbered checkpoint; or --resume names it."""
    out, marker = tmp_path / "out", tmp_path / "code_ran"
    out.mkdir()
    write_images(tmp_path / "data" / "train" / "a", 8)
    path = tmp_path / "elsewhere.pth" if where == "--resume" else out / where
    torch.save({"model": {"w": torch.ones(2)}, "config": {}, "run_state": {}, "extra": RunsCode(marker)}, path)
    extra = ("--resume", str(path)) if where == "--resume" else ()
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(tiny_args(tmp_path / "data", out, *extra))
    err = capsys.readouterr().err
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    assert exc.value.code == 2, err
    assert err.startswith(f"fcmae-pretrain: error: refused to load checkpoint {path}: ") and "could run code" in err
    assert "os.mkdir" in err or "posix.mkdir" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def config_of(command, tmp_path) -> dict:
    """The settings of a tiny run of `command`, as a resume compares them."""
    if command == "pretrain":
        argv = tiny_args(tmp_path / "data", tmp_path / "out")
    else:
        argv = ["atto", "none", "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                *TINY_ARGS]
    return COMMANDS[command].resolve_config(argv).to_dict()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_settings_a_resume_may_change_are_these_and_no_others(command):
    spec = COMMANDS[command].SPEC
    assert set(resume.HARMLESS) == RUNTIME_HARMLESS
    assert set(spec.harmless_on_resume) == RUNTIME_HARMLESS | COMMAND_HARMLESS[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_change_of_any_other_setting_stops_the_resume(command, tmp_path):
    spec = COMMANDS[command].SPEC
    current = config_of(command, tmp_path)
    others = sorted(set(current) - RUNTIME_HARMLESS - COMMAND_HARMLESS[command] - {"plan"})
    assert MEANINGFUL[command] <= set(others)
    path = Path("checkpoint-last.pth")
    for key in others:
        saved = {"config": {**current, key: "<another value>"}, "world_size": 1}
        with pytest.raises(ConfigChangeError, match=f"{key} '<another value>' -> "):
            resume.check_resume(saved, current, FixedPlan(24), path, spec.harmless_on_resume, allow=False)
    for key in sorted(spec.harmless_on_resume):  # and the harmless ones do not
        saved = {"config": {**current, key: "<another value>"}, "world_size": 1}
        resume.check_resume(saved, current, FixedPlan(24), path, spec.harmless_on_resume, allow=False)


class FixedPlan:
    """The one thing check_resume reads of this run's plan: its number of training images."""

    def __init__(self, num_images):
        self.num_images = num_images
