"""FCMAE pre-training of ConvNeXt V2 with the sparse encoder of `sparse`.

The names below are imported on first use, so that importing a light
submodule (fcmae.runtime.signals, which the commands load before torch to
catch early stop signals) does not import torch.
"""

import importlib

_EXPORTS = {"FCMAE": "fcmae.model", "build_fcmae": "fcmae.model", "patchify": "sparse.masking",
            "random_mask": "sparse.masking", "unpatchify": "sparse.masking"}

__all__ = ["FCMAE", "build_fcmae", "patchify", "random_mask", "unpatchify"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fcmae' has no attribute {name!r}")
