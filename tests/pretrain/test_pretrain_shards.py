"""Pre-training on WebDataset shards end to end on CPU: trains, resumes exactly, refuses bad specs."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcmae.pretrain import main as main_pretrain
from fcmae.runtime import checkpoint as ckpt
from tests.helpers import epoch_losses, single_process_env, tiny_args, train_losses, write_shards

REPO = Path(__file__).resolve().parents[2]


def run(args):
    return main_pretrain.run(main_pretrain.resolve_config(args))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 6 samples (72 px PNGs), with _info.json."""
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, shards=4, per_shard=6, size=72)
    return folder


def shard_args(data, out, *extra, **flags):
    return tiny_args(data, out, *extra, **{"num_workers": 2, "shuffle_buffer": 4, **flags})


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run(shard_args(f"{shards}/train-{{000000..000003}}.tar", out)) == 0
    return out


def test_a_brace_spec_trains_and_every_checkpoint_records_the_stream(reference_run):
    assert [s for s, _ in train_losses(reference_run)] == list(range(1, 13))  # 24 samples / batch 4, 2 epochs
    state = ckpt.load_checkpoint(reference_run / "checkpoint-0001.pth")
    assert state["stream"] == {"epoch": 1, "batch": 0, "ranks": 1, "workers": 2, "batch_size": 4, "samples": 24,
                               "buffer": 4, "shards": 4, "samples_read": [[0, 0]]}
    assert (reference_run / "reconstruction.png").is_file()


def test_a_folder_of_shards_and_train_num_samples_read_the_same_stream(shards, tmp_path, reference_run):
    out = tmp_path / "out"
    copy = tmp_path / "no_info"
    shutil.copytree(shards, copy)
    (copy / "_info.json").unlink()
    assert run(shard_args(copy, out, "--train_num_samples", "24")) == 0
    assert train_losses(out) == train_losses(reference_run)


def test_resume_mid_epoch_is_exact(shards, tmp_path, reference_run, capsys):
    out = tmp_path / "out"
    spec = f"{shards}/train-{{000000..000003}}.tar"
    assert run(shard_args(spec, out, "--exit_after_steps", "9")) == 0  # stops in epoch 2, at batch 3 of 6
    state = ckpt.load_checkpoint(out / "checkpoint-last.pth")
    assert state["stream"]["samples_read"] == [[8, 4]]  # batches 0 and 2 from worker 0, batch 1 from worker 1
    assert run(shard_args(spec, out)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert train_losses(out) == train_losses(reference_run)
    assert epoch_losses(out) == epoch_losses(reference_run)


def test_another_worker_count_on_resume_is_noted(shards, tmp_path, capsys):
    out = tmp_path / "out"
    spec = f"{shards}/train-{{000000..000003}}.tar"
    assert run(shard_args(spec, out, "--exit_after_steps", "3")) == 0
    assert run(shard_args(spec, out, num_workers=0)) == 0
    assert "the checkpoint read its shards with ranks 1, workers 2" in capsys.readouterr().out


def test_shards_without_a_count_are_a_one_line_error_before_any_compute(shards, tmp_path, capsys):
    copy = tmp_path / "no_info"
    shutil.copytree(shards, copy)
    (copy / "_info.json").unlink()
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(shard_args(copy, tmp_path / "out"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "have no sample count" in err and "--train_num_samples" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_shard_that_vanishes_mid_run_stops_with_the_checkpoint_intact(shards, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    out = tmp_path / "out"
    spec = f"{copy}/train-{{000000..000003}}.tar"
    assert run(shard_args(spec, out, "--exit_after_steps", "7")) == 0  # into epoch 2
    saved = (out / "checkpoint-last.pth").read_bytes()
    with pytest.raises(SystemExit) as exc:  # a spec naming a missing shard is refused before any compute
        main_pretrain.main(shard_args(f"{copy}/train-{{000000..000004}}.tar", out))
    assert exc.value.code == 2 and "1 of the 5 shards" in capsys.readouterr().err
    real_build = main_pretrain.build_dataset

    def build_then_lose_a_shard(*args, **kwargs):
        dataset = real_build(*args, **kwargs)
        (copy / "train-000002.tar").unlink()  # after the start-up checks: lost while the run reads
        return dataset

    monkeypatch.setattr(main_pretrain, "build_dataset", build_then_lose_a_shard)
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(shard_args(spec, out))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "train-000002.tar does not exist (any more)" in err and len(err.splitlines()) == 1
    assert (out / "checkpoint-last.pth").read_bytes() == saved
    assert ckpt.load_checkpoint(out / "checkpoint-last.pth")["step"] == 7


@pytest.mark.slow
def test_a_sigkill_run_resumes_to_the_same_final_loss(shards, tmp_path, reference_run):
    out = tmp_path / "out"
    # The same shards through a slow `pipe:` (each shard waits half a second), so that the kill lands mid-epoch.
    slow = f"pipe:sleep 0.5 && cat {shards}/train-{{000000..000003}}.tar"
    args = [sys.executable, "-m", "fcmae.pretrain.main", *shard_args(slow, out, "--train_num_samples", "24")]
    proc = subprocess.Popen(args, cwd=REPO, env=single_process_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 2/2  step 1/"):  # mid-epoch 2: only epoch 1's checkpoint is on disk
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    resumed = subprocess.run(args, cwd=REPO, env=single_process_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert epoch_losses(out)[-1] == epoch_losses(reference_run)[-1]
    assert train_losses(out)[-6:] == train_losses(reference_run)[-6:]


def test_a_checkpoint_from_before_the_shard_settings_resumes(image_dir, tmp_path):
    """Checkpoints written before shuffle_buffer existed do not store it: they resume, not stop on a change."""
    out = tmp_path / "out"
    assert run(tiny_args(image_dir, out, "--exit_after_steps", "2")) == 0
    saved = torch.load(out / "checkpoint-last.pth", weights_only=False)  # not memory-mapped: rewritten below
    del saved["config"]["shuffle_buffer"]
    torch.save(saved, out / "checkpoint-last.pth")
    assert run(tiny_args(image_dir, out)) == 0
    assert [s for s, _ in train_losses(out)] == list(range(1, 13))
