"""The README's three shard commands, run as written (plus flags for a tiny model) on held-out photographs:
make 4 shards, pre-train on them with launch/pretrain.sh, kill and resume, fine-tune on the labelled shards."""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fcmae.data.demo import build_demo_folder
from fcmae.data.folder import list_images
from tests.helpers import TINY_ARGS, epoch_losses, single_process_env

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CPU = ["--device", "cpu", "--num_workers", "2", "--cpu_threads", "1"]
# Appended to each command: a tiny model and small images on CPU (and to fcmae-make-shards, the shard size that
# makes 4 train shards).
EXTRA = {
    "launch/pretrain.sh": [*TINY_ARGS, "--decoder_dim", "16", "--input_size", "64", "--epochs", "3",
                           "--warmup_epochs", "1", "--batch_size", "4", "--effective_batch", "4", "--print_every", "1",
                           *CPU],
    "launch/finetune.sh": [*TINY_ARGS, "--input_size", "64", "--epochs", "2", "--warmup_epochs", "1",
                           "--batch_size", "4", "--effective_batch", "4", *CPU],
}


def readme_commands():
    """The commands of the README's "Sharded data sets" bash block, comments removed."""
    section = README.read_text().split("## Sharded data sets (WebDataset)", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_shows_the_three_commands():
    assert [c.split()[0] for c in readme_commands()] == ["fcmae-make-shards", "launch/pretrain.sh",
                                                        "launch/finetune.sh"]


@pytest.mark.slow
def test_make_shards_pretrain_with_a_kill_and_fine_tune_as_the_readme_says(tmp_path):
    photos = build_demo_folder(tmp_path / "cache", crop_size=64, train_per_photo=8, val_per_photo=2, short_side=96)
    per_shard = -(-len(list_images(photos / "train")) // 4)
    data = tmp_path / "data"
    data.mkdir()
    (data / "photos").symlink_to(photos)
    work = tmp_path / "work"
    work.mkdir()
    (work / "launch").symlink_to(REPO / "launch")
    env = single_process_env(PYTHON=sys.executable, FCMAE_LAUNCHER="python", PYTHONPATH=str(REPO),
                             OMP_NUM_THREADS="1")

    def command(text):
        words = text.replace("/data/", f"{data}/")
        extra = EXTRA.get(text.split()[0], ["--samples_per_shard", str(per_shard)])
        return ["bash", "-c", " ".join([words, *map(shlex.quote, extra)])]

    make, pretrain, finetune = readme_commands()
    made = subprocess.run(command(make), cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    assert sorted(p.name for p in (data / "shards").glob("train-*.tar")) == [f"train-{i:06d}.tar" for i in range(4)]

    # Pre-train, killed with SIGKILL in epoch 3 (epoch 2's checkpoint on disk), then the same command again.
    out = work / "output" / "pretrain" / "atto_demo_shards"
    proc = subprocess.Popen(command(pretrain), cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 3/3 "):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    resumed = subprocess.run(command(pretrain), cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and len(epoch_losses(out)) == 3
    whole = work / "whole"  # the same run uninterrupted, in a folder of its own
    uninterrupted = subprocess.run(command(pretrain + f" --output_dir {whole}"), cwd=work, env=env,
                                   capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert epoch_losses(out)[-1] == epoch_losses(whole)[-1]

    tuned = subprocess.run(command(finetune), cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    assert re.search(r"val top-1 [\d.]+%", tuned.stdout), tuned.stdout[-3000:]
