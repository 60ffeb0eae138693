"""Checkpoints: atomic writes, keep-newest-N, auto-resume, RNG state, resume checks.

Layout in an output directory:

    checkpoint-last.pth      written after every epoch (and on pre-emption)
    checkpoint-0040.pth      every `save_every` epochs; the newest `keep` stay
    checkpoint-best.pth      fine-tuning: the epoch of the best validation top-1 (never resumed from)

Checkpoints are written with fcmae.runtime.files.write_atomic, so a crash
mid-write never destroys the previous one. They hold only tensors and plain
Python types (the RNG states too), so they load with
`torch.load(path, weights_only=True)`; `load_checkpoint` reads every file
that way, memory-mapped (`mmap=True`) when the file is in torch's zip
format, so that the processes of a node that resume together do not each
hold a full copy in memory: pages are read as the tensors are copied into
the model and optimizer.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from fcmae.runtime.errors import CheckpointError
from fcmae.runtime.files import write_atomic

PathLike = Union[str, os.PathLike]

LAST_NAME = "checkpoint-last.pth"
BEST_NAME = "checkpoint-best.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")


def save_atomic(obj: Any, path: PathLike) -> Path:
    """torch.save `obj` to `path` atomically (see fcmae.runtime.files.write_atomic)."""
    return write_atomic(path, lambda f: torch.save(obj, f), size_hint=tensor_bytes(obj))


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists, tuples): about the size torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint dict; a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = load_weights_only(path, map_location)
    except pickle.UnpicklingError as e:
        refusal = code_refusal(e)
        if refusal is not None:
            raise CheckpointError(
                f"refused to load checkpoint {path}: it holds more than tensors and plain Python types, and "
                f"unpickling it could run code ({refusal}). Load only files you trust") from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint of tensors and plain "
            "Python types, which is all torch.load(weights_only=True) reads") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint ({e})"
        ) from None
    except Exception as e:  # unpickling errors of arbitrary files
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (a {type(obj).__name__}, expected a dict)")
    return obj


def code_refusal(error: pickle.UnpicklingError) -> Optional[str]:
    """What torch.load(weights_only=True) refused to build (`it names posix.system`), when `error` says that the
    file would have built objects (run code) when unpickled; None for a file that is merely not a pickle."""
    text = str(error)
    match = re.search(r"GLOBAL\s+([\w.]+)", text)
    if match:
        return f"it names {match.group(1)}"
    match = re.search(r"Trying to call reduce for \S+", text)
    return match.group(0) if match else None


def load_weights_only(path: PathLike, map_location: Union[str, torch.device] = "cpu", allowed: Sequence = ()) -> Any:
    """torch.load(weights_only=True), memory-mapped for zip-format files (all torch.save writes since 1.6).

    The one place this project unpickles torch files. Besides tensors and
    plain types it admits argparse.Namespace (the reference release's
    checkpoints hold their `args` as one) and the globals in `allowed`.
    Errors are torch's; the callers turn them into one-line messages.
    """
    mmap = zipfile.is_zipfile(path)  # the legacy format cannot be mapped
    with torch.serialization.safe_globals([argparse.Namespace, *allowed]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def numbered_checkpoints(output_dir: PathLike) -> List[Path]:
    """`checkpoint-<epoch>.pth` files in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NUMBERED.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The checkpoint to auto-resume from: `checkpoint-last.pth`, else the newest numbered one."""
    last = Path(output_dir) / LAST_NAME
    if last.is_file():
        return last
    numbered = numbered_checkpoints(output_dir)
    return numbered[-1] if numbered else None


def save_checkpoint(
    state: Dict[str, Any],
    output_dir: PathLike,
    epoch_done: Optional[int] = None,
    save_every: int = 0,
    keep: int = 0,
    best: bool = False,
) -> List[Path]:
    """Write `checkpoint-last.pth`; also `checkpoint-<epoch_done>.pth` every `save_every` epochs, and
    `checkpoint-best.pth` when `best`.

    `epoch_done` is the number of completed epochs (None for a mid-epoch
    save). Only the newest `keep` numbered checkpoints are kept (0: all).
    Returns the paths written.
    """
    output_dir = Path(output_dir)
    written = [save_atomic(state, output_dir / LAST_NAME)]
    if epoch_done is not None and save_every and epoch_done % save_every == 0:
        numbered = output_dir / f"checkpoint-{epoch_done:04d}.pth"
        written.append(_same_file(written[0], numbered, state))
        prune_checkpoints(output_dir, keep, protect=numbered)
    if best:
        written.append(_same_file(written[0], output_dir / BEST_NAME, state))
    return written


def _same_file(written: Path, target: Path, state: Dict[str, Any]) -> Path:
    """`target` as a hard link to the checkpoint just `written` (no second write), atomically replacing it.

    Safe because later saves replace checkpoint-last.pth by rename, never in place. File systems without hard
    links get a second atomic write of `state`.
    """
    tmp = target.parent / f".{target.name}.link.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.link(written, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        save_atomic(state, target)
    return target


def prune_checkpoints(output_dir: PathLike, keep: int, protect: Optional[PathLike] = None) -> None:
    """Delete all but the newest `keep` numbered checkpoints (keep <= 0: delete none).

    `protect` (the checkpoint just written) is always kept and counts as one
    of the `keep`, even when files of higher epochs are left over from an
    earlier run in the same directory (e.g. after resuming from an older
    checkpoint, or with --resume none).
    """
    if keep <= 0:
        return
    found = numbered_checkpoints(output_dir)
    if protect is not None:
        protect = Path(protect)
        others = [p for p in found if p.name != protect.name]
        if len(others) < len(found):
            found, keep = others, keep - 1
    for old in (found[:-keep] if keep > 0 else found):
        old.unlink(missing_ok=True)


def rng_state() -> Dict[str, Any]:
    """The state of every random generator training uses, as tensors and plain types (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None): plain types
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def check_writable(output_dir: PathLike) -> Path:
    """Create `output_dir` if needed and prove it is writable; a clear error otherwise."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=output_dir)
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)  # a run that holds the folder's lock may have removed it already
    except OSError as e:
        raise CheckpointError(f"output directory {output_dir} is not writable: {e.strerror or e}") from None
    return output_dir


# ---------------------------------------------------------------- resuming
def find_resume(resume: Optional[str], output_dir: PathLike) -> Optional[Path]:
    """The checkpoint to resume from: a path, the newest in output_dir ('auto'), or None ('none')."""
    if resume is None:
        return None
    if resume.lower() == "auto":
        return find_latest_checkpoint(output_dir)
    return Path(resume)
