"""Sparse encoder / FCMAE weights -> timm's dense `convnextv2_<size>`.

The one place that knows how this project's parameter names map to timm's.
"""

import re
from typing import Dict, Optional, Tuple

import torch

from sparse.sizes import TIMM_CONV_MLP_SIZES, size_of

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def encoder_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder's own entries of an encoder or FCMAE model state dict."""
    if any(k.startswith("encoder.") for k in state_dict):
        return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return dict(state_dict)


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Depths and dims of the encoder whose (timm-named) weights these are."""
    depths = [0, 0, 0, 0]
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths[stage], block + 1)
    dims = [state_dict[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0] for i in range(4)]
    return tuple(depths), tuple(dims)


def to_timm(state_dict: Dict[str, torch.Tensor], conv_mlp: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """A state dict that timm's `convnextv2_<size>` loads (only the head missing).

    `conv_mlp` says whether the target builds its block MLPs as 1x1 convs
    (timm does so for atto, femto, pico and nano); by default it is inferred
    from the size the weights have.
    """
    weights = encoder_state(state_dict)
    if conv_mlp is None:
        conv_mlp = size_of(*infer_arch(weights)) in TIMM_CONV_MLP_SIZES
    out = {}
    for key, value in weights.items():
        if conv_mlp and re.search(r"\.mlp\.fc[12]\.weight$", key) and value.dim() == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out
