"""Small shared pieces of the tests: tiny configs and runs, random weights, random masks, image files, a
single-process environment."""

import io
import json
import math
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import webdataset as wds
from PIL import Image

from fcmae.runtime.logs import read_jsonl
from sparse import masking

TINY_DEPTHS = (1, 2, 1, 1)
TINY_DIMS = (8, 16, 24, 32)
# The tiny model of the command tests, as flags of both commands.
TINY_ARGS = ["--depths", "[1, 1, 1, 1]", "--dims", "[8, 16, 16, 16]"]
# One CPU process, no autocast, no loader workers.
CPU_ARGS = ["--device", "cpu", "--amp", "off", "--num_workers", "0"]
# The tiny pre-training run of the command tests (flag -> value), on top of TINY_ARGS; see tiny_args.
TINY_RUN = {"decoder_dim": 32, "input_size": 64, "mask_ratio": 0.5, "batch_size": 4, "effective_batch": 4,
            "epochs": 2, "warmup_epochs": 1, "num_workers": 0, "print_every": 1, "vis_images": 2, "save_every": 1,
            "keep_checkpoints": 2, "device": "cpu"}

# What makes a process one rank of several or picks its launcher: torchrun's, the launcher's and (see
# is_dist_variable) SLURM's variables.
DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NPROC_PER_NODE",
                  "NNODES", "FCMAE_LAUNCHER", "FCMAE_SLURM_RANKS", "TORCHELASTIC_RUN_ID")


def tiny_args(data, out, *extra, **flags) -> List[str]:
    """The command line of a tiny pre-training run (`atto demo`, TINY_ARGS' model, TINY_RUN) on `data` into `out`.

    Args:
        extra: more arguments, appended as given.
        flags: TINY_RUN's values to change or flags to add (name without `--`, e.g. `decoder_dim=16`); None
            leaves the flag out, so the command's default applies.
    """
    settings = {**TINY_RUN, **flags}
    given = [item for name, value in settings.items() if value is not None for item in (f"--{name}", str(value))]
    return ["atto", "demo", "--data_path", str(data), "--output_dir", str(out), *TINY_ARGS, *given, *extra]


def is_dist_variable(name: str) -> bool:
    """Whether torchrun, the launcher or SLURM set `name` (every SLURM_* but SLURM_CONF, which names the cluster)."""
    return name in DIST_VARIABLES or (name.startswith("SLURM_") and name != "SLURM_CONF")


def single_process_env(**extra: str) -> Dict[str, str]:
    """This process's environment without the variables of is_dist_variable, plus `extra`: for a child that
    runs as one process (or gets its own rank variables in `extra`)."""
    return {**{k: v for k, v in os.environ.items() if not is_dist_variable(k)}, **extra}


def write_images(folder: Path, count: int, size: int = 72, seed: int = 0) -> None:
    """`count` smooth, slightly noisy RGB PNGs of `size` x `size` (different per index and seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        base = np.stack([np.sin(xx / (3 + i % 5)), np.cos(yy / (2 + i % 7)), np.sin((xx + yy) / 9.0)], -1)
        img = ((base * 0.4 + 0.5 + rng.rand(size, size, 3) * 0.1).clip(0, 1) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter random values of a sensible scale (in place).

    Norm scales, GRN gamma/beta and all biases start as constants; tests
    randomise them so that a wrong mapping or a missing term shows.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() > 1:
                fan_in = param[0].numel()
                param.copy_(noise / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs error <= rel x the largest magnitude of `expected` (a scale-aware tolerance)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


def random_mask(batch: int, num_patches: int, num_masked: int, seed: int) -> torch.Tensor:
    """(N, L) float mask, 1 = masked, exactly num_masked masked patches per image (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return masking.random_mask(batch, num_patches, num_masked=num_masked, generator=gen)


def build_with_nan_loss(real_build, at_call: int):
    """A `build_fcmae` whose model's training loss turns NaN at its `at_call`-th training forward."""

    def build_with_nan(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward, calls = model.forward, {"n": 0}

        def nan_forward(imgs, mask=None):
            loss, pred, mask = forward(imgs, mask)
            if model.training:
                calls["n"] += 1
                if calls["n"] == at_call:
                    loss = loss * float("nan")
            return loss, pred, mask

        model.forward = nan_forward
        return model

    return build_with_nan


def steps_logged(out) -> list:
    """The optimizer steps of the 'train' records in OUT/log.jsonl so far ([] before the first, or mid-write)."""
    path = Path(out) / "log.jsonl"
    try:
        return [r["step"] for r in read_jsonl(path) if r["type"] == "train"] if path.exists() else []
    except ValueError:  # a line being written
        return []


def write_shards(folder: Path, shards: int, per_shard: int, size: int = 48, prefix: str = "train", seed: int = 0,
                 kind: str = "png", classes: int = 3, info: bool = True) -> List[str]:
    """`shards` WebDataset shards of `per_shard` labelled samples each (`prefix`-000000.tar, ...) in `folder`, with
    an _info.json unless `info` is False; returns the keys in order. kind: 'png' (8-bit RGB), 'png16' (16-bit
    grey) or 'jpg'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    keys, names = [], []
    for s in range(shards):
        name = f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for i in range(per_shard):
                n = s * per_shard + i
                if kind == "png16":
                    pixels = (rng.rand(size, size) * 65535).astype(np.uint16)
                else:
                    pixels = (rng.rand(size, size, 3) * 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG" if kind == "jpg" else "PNG")
                key = f"{n:09d}"
                writer.write({"__key__": key, "jpg" if kind == "jpg" else "png": buffer.getvalue(),
                              "cls": str(n % classes).encode()})
                keys.append(key)
        names.append(name)
    if info:
        (folder / "_info.json").write_text(json.dumps({
            "name": folder.name, "fcmae_shards": 1, "classes": [f"class{c}" for c in range(classes)],
            "splits": {prefix: {"name": prefix, "num_samples": shards * per_shard, "filenames": names,
                                "shard_lengths": [per_shard] * shards}}}))
    return keys


def train_losses(out) -> list:
    """(step, loss) of each train record of a run's log.jsonl."""
    return [(r["step"], r["loss"]) for r in read_jsonl(Path(out) / "log.jsonl") if r["type"] == "train"]


def epoch_losses(out) -> list:
    """The loss of each epoch record of a run's log.jsonl."""
    return [r["loss"] for r in read_jsonl(Path(out) / "log.jsonl") if r["type"] == "epoch"]
