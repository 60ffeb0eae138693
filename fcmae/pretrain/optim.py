"""The pre-training optimizer: AdamW with weight decay on the weight matrices and kernels only."""

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from fcmae.runtime.device import adamw_fused

# Parameters the reference release decays although they are not weight matrices (see docs/PUBLISHED_SETTINGS.md).
REFERENCE_DECAYED = ("grn.weight", "grn.bias", "mask_token")


def param_groups(model: nn.Module, weight_decay: float, decay_grn_and_mask_token: bool = False) -> List[Dict]:
    """Two groups: decayed, and not decayed (biases, 1-d parameters, mask token, model.no_weight_decay()).

    Args:
        decay_grn_and_mask_token: decay GRN gamma/beta and the mask token too (the reference release).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim > 1 and not name.endswith(".bias") and name not in skip
        reference = decay_grn_and_mask_token and name.endswith(REFERENCE_DECAYED)
        (decay if plain or reference else no_decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float] = (0.9, 0.95),
                    decay_grn_and_mask_token: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; fused (one kernel per step) when every parameter is on one CUDA or CPU device."""
    return torch.optim.AdamW(param_groups(model, weight_decay, decay_grn_and_mask_token), lr=lr,
                             betas=tuple(betas), fused=adamw_fused(model))
