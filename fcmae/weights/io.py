"""Reading weight files safely, and writing them as .pth or .safetensors.

Every weight file that comes from outside this run (converter inputs,
pre-trained weights for fine-tuning or evaluation, the reference release's
checkpoints) is read here, and never by plain unpickling: a `.safetensors`
file holds tensors only; any other file goes through
`torch.load(weights_only=True)` (fcmae.runtime.checkpoint,
`load_weights_only`), which builds tensors and plain Python types and
refuses everything else, so a file that would run code when unpickled is
rejected before any of its code runs.

Two more types are allowed: argparse.Namespace (the reference release's
training checkpoints hold their `args` as one), and numpy arrays (this
project's older training checkpoints hold numpy's RNG state), through the
numpy reconstruction functions that torch documents as safe for
`weights_only` loading.
"""

from __future__ import annotations

import collections
import importlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fcmae.runtime.checkpoint import load_weights_only, save_atomic
from fcmae.runtime.files import write_atomic

PathLike = Union[str, os.PathLike]

__all__ = ["WeightsError", "read_weights", "write_weights", "SAFETENSORS_SUFFIX"]

SAFETENSORS_SUFFIX = ".safetensors"


class WeightsError(ValueError):
    """A weight file that cannot be read or written; the message is one line saying why."""

    exit_code = 2  # bad input, as fcmae.runtime.errors.UsageError


def _numpy_globals() -> list:
    """numpy's array-reconstruction globals (what np.random.get_state() pickles to)."""
    try:  # numpy 2 (numpy 1.26 also has it, as a shim that must be imported by name)
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    found = [multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by class
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes)
                  if name.endswith("DType") and isinstance(getattr(dtypes, name), type)]
    return found


def _refusal(error: Exception) -> str:
    """The informative part of torch's (long, multi-line) weights_only error."""
    text = str(error)
    match = re.search(r"GLOBAL\s+([\w.]+)", text)
    if match:
        return f"it names {match.group(1)}"
    match = re.search(r"(Unsupported operand \d+|Trying to call reduce for \S+)", text)
    return match.group(1) if match else type(error).__name__


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def read_weights(path: PathLike) -> Dict[str, Any]:
    """The dict stored in `path` (.safetensors, or a torch file read with weights_only=True), on the CPU.

    Raises WeightsError (one line) for a missing, truncated or foreign file,
    and for a file whose unpickling would build anything but tensors and
    plain types (such a file is refused before any of its code runs).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.name.endswith(SAFETENSORS_SUFFIX):
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"cannot read {path}: not a valid safetensors file ({e})") from None
    try:
        obj = load_weights_only(path, "cpu", allowed=_numpy_globals())
    except pickle.UnpicklingError as e:
        if not re.search(r"GLOBAL|reduce", str(e)):  # no object to build: not a pickle (text, random bytes)
            raise WeightsError(f"cannot read {path}: not a PyTorch checkpoint ({_refusal(e)})") from None
        raise WeightsError(
            f"refused to load {path}: it holds more than tensors and plain types, and unpickling it could run "
            f"code ({_refusal(e)}). Load only files you trust; re-save the weights as a plain state dict or "
            f".safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: the file is truncated or not a PyTorch checkpoint "
                           f"({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, expected a state dict or a checkpoint dict")
    return obj


def write_weights(state_dict: Dict[str, torch.Tensor], path: PathLike, metadata: Dict[str, str] = None) -> Path:
    """Write a flat state dict: safetensors when `path` ends in .safetensors, else torch.save; atomically."""
    path = Path(path)
    if not path.name.endswith(SAFETENSORS_SUFFIX):
        return save_atomic(state_dict, path)
    bad = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if bad:
        raise WeightsError(f"safetensors holds tensors only; not tensors: {', '.join(bad[:5])}")
    # safetensors refuses tensors that share memory (tied weights, views of one buffer): those are
    # copied; the others are written as they are, so a large model is held at most twice (itself and
    # the bytes safetensors makes).
    storages = collections.Counter(_storage_key(v) for v in state_dict.values())
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) if storages[_storage_key(v)] > 1
               else v.detach().contiguous()
               for k, v in state_dict.items()}
    return write_atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.device.type, tensor.untyped_storage().data_ptr()
