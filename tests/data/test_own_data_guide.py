"""The five commands that begin docs/own-data.md, run as written (plus flags for a tiny model) on a small folder of
photographs sorted by class: split, pre-train, convert, fine-tune, evaluate."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fcmae.data.demo import build_demo_folder
from fcmae.runtime.logs import read_jsonl
from tests.helpers import TINY_ARGS, single_process_env

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "own-data.md"
# Appended to the commands that train or evaluate: a tiny model, small images, two epochs, one CPU process.
TINY = {
    "launch/pretrain.sh": [*TINY_ARGS, "--decoder_dim", "16", "--input_size", "64", "--epochs", "2",
                           "--warmup_epochs", "1", "--batch_size", "8", "--effective_batch", "8"],
    "launch/finetune.sh": [*TINY_ARGS, "--input_size", "64", "--epochs", "2", "--warmup_epochs", "1",
                           "--batch_size", "8", "--effective_batch", "8"],
}
CPU = ["--device", "cpu", "--num_workers", "0", "--cpu_threads", "1"]


def guide_commands():
    """The commands of the first bash block of docs/own-data.md, comments removed."""
    block = re.search(r"```bash\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_guide_begins_with_five_commands():
    commands = guide_commands()
    assert [c.split()[0] for c in commands] == ["python", "launch/pretrain.sh", "launch/convert.sh",
                                                "launch/finetune.sh", "launch/finetune.sh"]
    assert "small" in commands[1] and "--config small" in commands[3]


@pytest.mark.slow
def test_the_five_commands_run_as_written(tmp_path):
    home = tmp_path / "home"
    photos = build_demo_folder(tmp_path / "cache", crop_size=64, train_per_photo=5, short_side=96) / "train"
    for name in sorted(os.listdir(photos))[:3]:  # three classes of 5 photographs
        shutil.copytree(photos / name, home / "my_photos" / name)
    work = tmp_path / "work"  # the commands' folder: launch/ as in the repository, output/ of its own
    work.mkdir()
    (work / "launch").symlink_to(REPO / "launch")
    env = single_process_env(HOME=str(home), PYTHON=sys.executable, FCMAE_LAUNCHER="python",
                             PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    outputs = []
    for command in guide_commands():
        extra = TINY.get(command.split()[0], []) + (CPU if command.split()[0] in TINY else [])
        result = subprocess.run(["bash", "-c", " ".join([command, *map(shlex.quote, extra)])], cwd=work, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)

    assert sorted(os.listdir(work / "photos")) == ["train", "val"]
    pre = work / "output" / "pretrain" / "atto_small_photos"
    for name in ("checkpoint-last.pth", "reconstruction.png", "log.jsonl", "config.yaml"):
        assert (pre / name).is_file(), name
    assert any(r["type"] == "knn" for r in read_jsonl(pre / "log.jsonl"))  # --knn_data_path photos
    assert "summary (from log.jsonl):" in outputs[1] and "kNN top-1" in outputs[1]
    assert (work / "atto_photos.pth").is_file()
    tuned = work / "output" / "finetune" / "atto_photos"
    assert (tuned / "checkpoint-last.pth").is_file() and "val top-1" in outputs[3]
    assert re.search(r"eval model: top-1 [\d.]+%", outputs[4]), outputs[4]
